"""The Hugging Face integration tests' setup: a tiny GPT-2 built from a config, random tokens, the
CPU, no download; a NaN injected into one gradient at chosen steps; the Trainer's clipping routed
through the paths accelerate releases take."""

from __future__ import annotations

import copy
import math

import torch
import transformers

STEPS = 24
MAX_GRAD_NORM = 0.5  # below the tiny model's norms (about 1.2 to 1.5): every step clips
NAN_STEP = 6  # the step (1-based, as the Trainer counts) whose gradients get a NaN
VOCAB, SEQ = 64, 16


def make_model():
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_layer=2,
        n_embd=32,
        n_head=2,
        vocab_size=VOCAB,
        n_positions=SEQ,
        n_inner=64,
        bos_token_id=0,
        eos_token_id=0,
    )
    return transformers.AutoModelForCausalLM.from_config(config)


def make_data(n=64):
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (n, SEQ), generator=gen)
    return [{"input_ids": row, "labels": row} for row in ids]


def make_args(tmp_path, **overrides):
    settings = dict(
        output_dir=str(tmp_path),
        max_steps=STEPS,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        max_grad_norm=MAX_GRAD_NORM,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    settings.update(overrides)
    return transformers.TrainingArguments(**settings)


class NanAt(transformers.TrainerCallback):
    """Makes one parameter's gradient NaN (every element) at the given steps, through a tensor
    hook, and records the weights and optimizer state around that step."""

    def __init__(self, model, steps):
        self.steps = set(steps)
        self.armed = False
        self.param = model.transformer.h[0].mlp.c_fc.weight
        self.param.register_hook(lambda g: g * math.nan if self.armed else g)
        self.before = self.after = None

    def on_step_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        self.armed = state.global_step + 1 in self.steps
        if self.armed and self.before is None:
            self.before = snapshot(model, optimizer)

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        if self.armed and self.after is None:
            self.after = snapshot(model, optimizer)
        self.armed = False


def snapshot(model, optimizer):
    return (
        {k: v.detach().clone() for k, v in model.state_dict().items()},
        copy.deepcopy(optimizer.state_dict()),
    )


def same_numbers(a, b):
    """Equal lists of floats, NaN equal to NaN."""
    return len(a) == len(b) and all(
        x == y or (math.isnan(x) and math.isnan(y)) for x, y in zip(a, b)
    )


def train(tmp_path, callbacks=(), nan_steps=(), resume=None, clip_path=None, **overrides):
    """A Trainer run; clip_path (one of CLIP_PATHS) replaces how accelerate clips."""
    model = make_model()
    extra = [NanAt(model, nan_steps)] if nan_steps else []
    trainer = transformers.Trainer(
        model=model,
        args=make_args(tmp_path, **overrides),
        train_dataset=make_data(),
        callbacks=[*callbacks, *extra],
    )
    if clip_path is not None:
        # The Trainer clips through its Accelerator's clip_grad_norm_(parameters, max_norm).
        trainer.accelerator.clip_grad_norm_ = CLIP_PATHS[clip_path]
    trainer.train(resume_from_checkpoint=resume)
    return trainer


# ---------------------------------------------- how accelerate releases clip, and how they might


def clip_in_one_call(parameters, max_norm, norm_type=2.0):
    """accelerate <= 1.15: torch.nn.utils.clip_grad_norm_ of the parameters."""
    return torch.nn.utils.clip_grad_norm_(list(parameters), max_norm, norm_type)


def clip_per_mesh(parameters, max_norm, norm_type=2.0):
    """accelerate 1.16: get_total_norm per device mesh (here two groups, interleaved), the norm of
    the stacked norms, then clip_grads_with_norm_ per group."""
    params = [p for p in parameters if p.grad is not None]
    groups = [params[0::2], params[1::2]]
    norms = [torch.nn.utils.get_total_norm([p.grad for p in g], norm_type) for g in groups]
    total = torch.linalg.vector_norm(torch.stack(norms), norm_type)
    if max_norm != math.inf:
        for group in groups:
            torch.nn.utils.clip_grads_with_norm_(group, max_norm, total)
    return total


def clip_own_way(parameters, max_norm, norm_type=2.0):
    """A release that uses none of torch.nn.utils' clipping functions."""
    grads = [p.grad for p in parameters if p.grad is not None]
    per_tensor = torch.stack([torch.linalg.vector_norm(g, norm_type) for g in grads])
    total = torch.linalg.vector_norm(per_tensor, norm_type)
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for g in grads:
        g.mul_(coef)
    return total


CLIP_PATHS = {"one call": clip_in_one_call, "per mesh": clip_per_mesh, "own way": clip_own_way}


def nan_probe(trainer):
    return next(cb for cb in trainer.callback_handler.callbacks if isinstance(cb, NanAt))


def step_logs(trainer):
    """The logs of training steps (grad_norm is in them when the Trainer computes a norm: always
    with max_grad_norm > 0; with 0 not in every release)."""
    return [h for h in trainer.state.log_history if "loss" in h]


def weights(trainer):
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
