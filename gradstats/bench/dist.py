"""The `dist` scenario: clipping under DDP and FSDP2, on ranks the benchmark launches itself.

    python -m gradstats bench --scenario dist [--device cpu|cuda] [--ranks 2]

Each rank builds the same model (its parameters shaped as a preset's: GPT-2 small's layer structure
scaled to a CPU-friendly width, or 2,000 small tensors), wraps it in DDP or FSDP2 (fully_shard), and
times, median of the rounds after a warm-up, side by side in the same processes:

- clip: torch.nn.utils.clip_grad_norm_; gradstats.clip_grad_norm_; GradPlan.clip_grad_norm_; with
  FSDP2 also gradstats on the ranks' plain local shards with process_group= (the floor: no DTensor
  at all);
- post-backward critical path: what runs between the end of backward and the end of the optimizer
  step (clip, then SGD's step), with a separate statistics pass, and with the statistics taken
  inside the gradient reduction (gradstats.distributed.attach), where the step only combines.

gloo on CPU; NCCL on GPUs (one per rank: --ranks may not exceed the GPUs). Times are wall clock of
rank 0 after a barrier, with a device synchronisation on GPUs. The rounds are interleaved.
"""

from __future__ import annotations

import datetime
import json
import os
import statistics
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import gradstats

# GPT-2 small's structure (embeddings, 12 blocks of attention and MLP with layer norms) with the
# width scaled down, so that two CPU ranks hold and reduce it in milliseconds: 148 tensors.
GPT2_LIKE_WIDTH, GPT2_LIKE_LAYERS, GPT2_LIKE_VOCAB, GPT2_LIKE_POSITIONS = 128, 12, 2048, 256
# The many-small case of the issue: 2,000 parameters of a few values each per rank.
MANY_SMALL_TENSORS, MANY_SMALL_VALUES = 2_000, 64
# The scenario's name, its default number of ranks, and the files it writes in the results folder.
DIST_SCENARIO = "dist"
DIST_RANKS = 2
DIST_FILES = {"json": "dist.json", "markdown": "dist.md"}
MAX_NORM = 1e-3  # below every norm: each step clips
# The rows of the post-backward critical path.
STEP_ALONE = "step alone: fused AdamW, no clip"
STEP_WITH_PASS = "step: ClipGradOptimizer + fused AdamW, a statistics pass"
STEP_FROM_REDUCTION = "step: ClipGradOptimizer + fused AdamW, statistics from the reduction"
WARMUP_ROUNDS, TIMED_ROUNDS = 3, 15
LOOPBACK = "127.0.0.1"
COLLECTIVE_TIMEOUT_S = 120
SPAWN_TIMEOUT_S = 900


@dataclass
class DistRow:
    wrapper: str  # ddp or fsdp2
    model: str
    tensors: int
    values: int
    side: str
    median_us: float
    torch_us: float  # torch's clip in the same rounds

    @property
    def speedup(self) -> float:
        return self.torch_us / self.median_us


def _gpt2_like_shapes() -> list[tuple[int, ...]]:
    w = GPT2_LIKE_WIDTH
    shapes: list[tuple[int, ...]] = [(GPT2_LIKE_VOCAB, w), (GPT2_LIKE_POSITIONS, w)]
    for _ in range(GPT2_LIKE_LAYERS):
        shapes += [(w,), (w,), (w, 3 * w), (3 * w,), (w, w), (w,)]  # ln_1, attention
        shapes += [(w,), (w,), (w, 4 * w), (4 * w,), (4 * w, w), (w,)]  # ln_2, MLP
    return [*shapes, (w,), (w,)]  # ln_f


MODELS: dict[str, Callable[[], list[tuple[int, ...]]]] = {
    "gpt2-small-like": _gpt2_like_shapes,
    "many-small": lambda: [(MANY_SMALL_VALUES,)] * MANY_SMALL_TENSORS,
}


class ShapedModel(nn.Module):
    """Parameters of the given shapes; the loss touches each once (its gradient is a random
    tensor's values), so that backward costs about what the gradients weigh."""

    def __init__(self, shapes: list[tuple[int, ...]], device: torch.device) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.weights = nn.ParameterList(
            nn.Parameter(torch.randn(s, generator=gen).to(device)) for s in shapes
        )

    def forward(self, scale: torch.Tensor) -> torch.Tensor:
        return sum((w * scale).sum() for w in self.weights)


def _nothing() -> None:
    pass


def _backward(model: nn.Module, params: list[nn.Parameter], scale: torch.Tensor) -> None:
    for p in params:
        p.grad = None
    model(scale).backward()


def _fused_adamw(params: list[nn.Parameter]) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=1e-3, fused=True)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(device: torch.device, fn: Callable[[], object]) -> float:
    dist.barrier()
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return (time.perf_counter() - start) * 1e6


def _wrap(wrapper: str, shapes, device: torch.device, world: int) -> nn.Module:
    model = ShapedModel(shapes, device)
    if wrapper == "ddp":
        ids = [device.index] if device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (world,))
    fully_shard(model, mesh=mesh)
    return model


def _measure(wrapper: str, name: str, device: torch.device, world: int) -> list[DistRow]:
    shapes = MODELS[name]()
    model = _wrap(wrapper, shapes, device, world)
    params = list(model.parameters())
    plan = gradstats.GradPlan(params)
    scale = torch.ones((), device=device)

    def backward() -> None:
        _backward(model, params, scale)

    def torch_clip() -> object:
        return torch.nn.utils.clip_grad_norm_(params, MAX_NORM)

    def gradstats_clip() -> object:
        return gradstats.clip_grad_norm_(params, MAX_NORM)

    # Each side: (what runs untimed after backward, what is timed).
    sides: dict[str, tuple[Callable[[], None], Callable[[], object]]] = {
        "torch clip_grad_norm_": (_nothing, torch_clip),
        "gradstats clip_grad_norm_": (_nothing, gradstats_clip),
        "GradPlan clip_grad_norm_": (_nothing, lambda: plan.clip_grad_norm_(MAX_NORM)),
    }
    if wrapper == "fsdp2":
        local = [nn.Parameter(torch.empty_like(p.to_local())) for p in params]

        def shards() -> None:
            for q, p in zip(local, params):
                q.grad = p.grad.to_local()

        def floor() -> object:
            return gradstats.clip_grad_norm_(local, MAX_NORM, process_group=dist.group.WORLD)

        sides["local shards + process_group (floor)"] = (shards, floor)
    # The post-backward critical path: the fused optimizer step alone, and with ClipGradOptimizer
    # folding the clip into it, after a statistics pass or with the statistics taken inside the
    # reduction (a second model: DDP takes one communication hook for its lifetime).
    other = _wrap(wrapper, shapes, device, world)
    handle = gradstats.distributed.attach(other)
    other_params = list(other.parameters())
    alone = _fused_adamw(params)
    with_pass = gradstats.ClipGradOptimizer(_fused_adamw(params), MAX_NORM)
    from_reduction = gradstats.ClipGradOptimizer(_fused_adamw(other_params), MAX_NORM)
    steps = {
        STEP_ALONE: (backward, alone.step),
        STEP_WITH_PASS: (backward, with_pass.step),
        STEP_FROM_REDUCTION: (lambda: _backward(other, other_params, scale), from_reduction.step),
    }
    times: dict[str, list[float]] = {k: [] for k in [*sides, *steps]}
    for round_ in range(WARMUP_ROUNDS + TIMED_ROUNDS):
        keep = round_ >= WARMUP_ROUNDS
        for side, (prepare, fn) in sides.items():
            backward()
            prepare()
            t = _timed(device, fn)
            if keep:
                times[side].append(t)
        for side, (run_backward, step) in steps.items():
            run_backward()
            t = _timed(device, step)
            if keep:
                times[side].append(t)
    handle.detach()
    medians = {k: statistics.median(v) for k, v in times.items() if v}
    torch_us = medians["torch clip_grad_norm_"]
    numel = sum(p.numel() if wrapper == "ddp" else p.to_local().numel() for p in params)
    return [
        DistRow(wrapper, name, len(params), numel, side, us, torch_us)
        for side, us in medians.items()
    ]


def _worker(rank: int, world: int, port: int, device_type: str, out: str, cases) -> None:
    result: dict = {}
    try:
        torch.set_num_threads(1)
        backend = "nccl" if device_type == "cuda" else "gloo"
        device = torch.device(device_type, rank) if device_type == "cuda" else torch.device("cpu")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        timeout = datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S)
        store = dist.TCPStore(LOOPBACK, port, is_master=False, timeout=timeout)
        dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout)
        rows = []
        for wrapper, name in cases:
            rows += [asdict(r) for r in _measure(wrapper, name, device, world)]
        result["rows"] = rows
    except Exception:
        result["error"] = traceback.format_exc()
    finally:
        if rank == 0:
            Path(out).write_text(json.dumps(result))
        if dist.is_initialized():
            dist.destroy_process_group()


def run_dist(device_type: str, world: int, cases=None) -> list[DistRow]:
    """Launches `world` ranks and returns rank 0's rows. Raises with the rank's traceback."""
    cases = cases or [(w, m) for w in ("ddp", "fsdp2") for m in MODELS]
    if device_type == "cuda" and torch.cuda.device_count() < world:
        raise RuntimeError(
            f"the dist scenario on cuda needs one GPU per rank: {world} ranks, "
            f"{torch.cuda.device_count()} GPU(s); use --ranks {torch.cuda.device_count()} or "
            "--device cpu"
        )
    store = dist.TCPStore(LOOPBACK, 0, is_master=True, wait_for_workers=False)
    out = Path(os.environ.get("TMPDIR", "/tmp")) / f"gradstats-dist-{os.getpid()}.json"
    ctx = mp.get_context("spawn")
    procs = [
        ctx.Process(target=_worker, args=(r, world, store.port, device_type, str(out), cases))
        for r in range(world)
    ]
    for p in procs:
        p.start()
    deadline = time.monotonic() + SPAWN_TIMEOUT_S
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.kill()
            raise RuntimeError(f"the dist scenario's ranks did not finish in {SPAWN_TIMEOUT_S} s")
    result = json.loads(out.read_text()) if out.exists() else {"error": "rank 0 saved nothing"}
    out.unlink(missing_ok=True)
    if "error" in result:
        raise RuntimeError(f"the dist scenario failed on rank 0:\n{result['error']}")
    return [DistRow(**row) for row in result["rows"]]


def markdown(rows: list[DistRow], machine: str, world: int) -> str:
    lines = [
        f"**dist scenario** ({world} ranks; {machine}): median wall time on rank 0 after a "
        "barrier; speedup = torch's clip / this side, measured in the same rounds",
        "",
        "| wrapper | model | tensors/rank | values/rank | side | median us | vs torch clip |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.wrapper} | {r.model} | {r.tensors:,} | {r.values:,} | {r.side} | "
            f"{r.median_us:,.0f} | {r.speedup:.2f}x |"
        )
    lines += ["", "The clip's share of the post-backward critical path (step - step alone):", ""]
    for (wrapper, model), share in clip_shares(rows).items():
        with_pass, from_reduction = share
        lines.append(
            f"- {wrapper}, {model}: {with_pass:,.0f} us after a statistics pass, "
            f"{from_reduction:,.0f} us with the statistics from the reduction "
            f"({from_reduction / with_pass:.0%} of the pass's)"
        )
    return "\n".join(lines)


def clip_shares(rows: list[DistRow]) -> dict[tuple[str, str], tuple[float, float]]:
    """Per (wrapper, model): what the clip adds to the fused step, after a pass and with the
    statistics from the reduction (floored at 1 us: noise can make the difference negative)."""
    by = {(r.wrapper, r.model, r.side): r.median_us for r in rows}
    out = {}
    for wrapper, model in dict.fromkeys((r.wrapper, r.model) for r in rows):
        alone = by.get((wrapper, model, STEP_ALONE))
        if alone is None:
            continue
        out[(wrapper, model)] = (
            max(1.0, by[(wrapper, model, STEP_WITH_PASS)] - alone),
            max(1.0, by[(wrapper, model, STEP_FROM_REDUCTION)] - alone),
        )
    return out


__all__ = [
    "DIST_FILES",
    "DIST_RANKS",
    "DIST_SCENARIO",
    "MODELS",
    "DistRow",
    "clip_shares",
    "markdown",
    "run_dist",
]
