"""Gradient shapes of real models, for the benchmark: the parameter shapes, in the models' order.

Only the shapes matter to a norm or a clip (the values are random), so no model is built.
"""

from __future__ import annotations

from dataclasses import dataclass

Shape = tuple[int, ...]


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    shapes: tuple[Shape, ...]

    @property
    def num_tensors(self) -> int:
        return len(self.shapes)

    @property
    def numel(self) -> int:
        total = 0
        for shape in self.shapes:
            count = 1
            for size in shape:
                count *= size
            total += count
        return total


# GPT-2 small (Hugging Face gpt2): 124,439,808 parameters in 148 tensors, lm_head tied to wte.
GPT2_VOCAB, GPT2_POSITIONS, GPT2_WIDTH, GPT2_LAYERS = 50257, 1024, 768, 12
GPT2_MLP = 4 * GPT2_WIDTH
GPT2_QKV = 3 * GPT2_WIDTH

# Llama 3.2 1B: 1,235,814,400 parameters in 146 tensors, embeddings tied to the output layer.
LLAMA_VOCAB, LLAMA_WIDTH, LLAMA_MLP, LLAMA_LAYERS = 128256, 2048, 8192, 16
LLAMA_KV_WIDTH = 512  # 8 key/value heads of 64 (grouped-query attention)

# torchvision resnet50: 25,557,032 parameters in 161 tensors.
RESNET_STAGES = ((64, 3), (128, 4), (256, 6), (512, 3))  # (bottleneck width, blocks)
RESNET_EXPANSION = 4
RESNET_STEM = 64
RESNET_STEM_KERNEL = 7
RESNET_CLASSES = 1000

# torchvision vit_b_16: 86,567,656 parameters in 152 tensors.
VIT_WIDTH, VIT_MLP, VIT_LAYERS, VIT_PATCH, VIT_IMAGE = 768, 3072, 12, 16, 224
VIT_CLASSES, VIT_CHANNELS = 1000, 3

MANY_SMALL = (10_000, 1_000)  # tensors, values each: per-tensor overhead dominates
MANY_TINY = (2_000, 64)  # the core issue's small-list case
MANY_MEDIUM = (1_000, 4_096)  # the GPU launch-overhead case


def gpt2_small() -> Preset:
    width = GPT2_WIDTH
    layer = [
        (width,), (width,),  # ln_1
        (width, GPT2_QKV), (GPT2_QKV,),  # attn.c_attn (Conv1D: in, out)
        (width, width), (width,),  # attn.c_proj
        (width,), (width,),  # ln_2
        (width, GPT2_MLP), (GPT2_MLP,),  # mlp.c_fc
        (GPT2_MLP, width), (width,),  # mlp.c_proj
    ]  # fmt: skip
    shapes = [(GPT2_VOCAB, width), (GPT2_POSITIONS, width)]
    shapes += layer * GPT2_LAYERS
    shapes += [(width,), (width,)]  # ln_f
    return Preset("gpt2-small", "GPT-2 small (124M)", tuple(shapes))


def llama_1b(layers: int = LLAMA_LAYERS) -> Preset:
    width = LLAMA_WIDTH
    layer = [
        (width, width), (LLAMA_KV_WIDTH, width), (LLAMA_KV_WIDTH, width), (width, width),  # attn
        (LLAMA_MLP, width), (LLAMA_MLP, width), (width, LLAMA_MLP),  # gate, up, down
        (width,), (width,),  # input and post-attention RMSNorm
    ]  # fmt: skip
    shapes = [(LLAMA_VOCAB, width), *(layer * layers), (width,)]
    of = "" if layers == LLAMA_LAYERS else f", {layers} of {LLAMA_LAYERS} layers"
    return Preset("llama-1b", f"Llama-3.2-1B shapes{of}", tuple(shapes))


def resnet50() -> Preset:
    shapes: list[Shape] = [(RESNET_STEM, 3, RESNET_STEM_KERNEL, RESNET_STEM_KERNEL)]
    shapes += [(RESNET_STEM,)] * 2
    inplanes = RESNET_STEM
    for width, blocks in RESNET_STAGES:
        out = width * RESNET_EXPANSION
        for block in range(blocks):
            shapes += [(width, inplanes, 1, 1), (width,), (width,)]
            shapes += [(width, width, 3, 3), (width,), (width,)]
            shapes += [(out, width, 1, 1), (out,), (out,)]
            if block == 0:  # the projection shortcut
                shapes += [(out, inplanes, 1, 1), (out,), (out,)]
            inplanes = out
    shapes += [(RESNET_CLASSES, inplanes), (RESNET_CLASSES,)]
    return Preset("resnet50", "ResNet-50 (25.6M)", tuple(shapes))


def vit_b16() -> Preset:
    width = VIT_WIDTH
    tokens = (VIT_IMAGE // VIT_PATCH) ** 2 + 1
    shapes: list[Shape] = [
        (1, 1, width),  # class token
        (width, VIT_CHANNELS, VIT_PATCH, VIT_PATCH), (width,),  # patch embedding
        (1, tokens, width),  # position embedding
    ]  # fmt: skip
    layer = [
        (width,), (width,),
        (3 * width, width), (3 * width,), (width, width), (width,),  # attention
        (width,), (width,),
        (VIT_MLP, width), (VIT_MLP,), (width, VIT_MLP), (width,),  # MLP
    ]  # fmt: skip
    shapes += layer * VIT_LAYERS
    shapes += [(width,), (width,), (VIT_CLASSES, width), (VIT_CLASSES,)]
    return Preset("vit-b16", "ViT-B/16 (86.6M)", tuple(shapes))


def uniform(name: str, count: int, size: int) -> Preset:
    return Preset(name, f"{count:,} tensors of {size:,} values", ((size,),) * count)


PRESET_NAMES = (
    "gpt2-small",
    "llama-1b",
    "resnet50",
    "vit-b16",
    "many-small",
    "many-tiny",
    "many-medium",
)


def make_preset(name: str, llama_layers: int = LLAMA_LAYERS) -> Preset:
    builders = {
        "gpt2-small": gpt2_small,
        "llama-1b": lambda: llama_1b(llama_layers),
        "resnet50": resnet50,
        "vit-b16": vit_b16,
        "many-small": lambda: uniform("many-small", *MANY_SMALL),
        "many-tiny": lambda: uniform("many-tiny", *MANY_TINY),
        "many-medium": lambda: uniform("many-medium", *MANY_MEDIUM),
    }
    if name not in builders:
        raise ValueError(f"unknown preset {name!r}; choose from {', '.join(PRESET_NAMES)}")
    return builders[name]()
