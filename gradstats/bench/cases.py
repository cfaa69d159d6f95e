"""The benchmark's inputs and scenarios: rotating copies of random gradients, and the sides to time.

Scenarios (gradstats against torch, on the same data):
- stats: gradstats.grad_stats (total and per-tensor norms, NaN/Inf counts) against
  torch.nn.utils.get_total_norm (the total norm alone);
- clip-noop: clip_grad_norm_ with max_norm above the norm (nothing to clip);
- clip: clip_grad_norm_ with max_norm below the norm (every gradient is scaled);
- adamw-step: gradstats.ClipGradOptimizer over a fused AdamW against clip_grad_norm_ followed by
  the same fused AdamW; the bare AdamW step is timed too.
stats, clip-noop and clip also time gradstats.GradPlan (the "planned" side) next to the plain call;
ClipGradOptimizer plans its parameters itself. The host-overhead scenario (gradstats.bench.host)
times the host work alone, on 1-element gradients.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

import gradstats
from gradstats.bench.presets import Preset
from gradstats.bench.timing import Pool, Side

# The scenarios timed on each preset's gradients (bytes that must move, bandwidth floor), and the
# one timed once per run on 1-element gradients (host work only).
BANDWIDTH_SCENARIOS = ("stats", "clip-noop", "clip", "adamw-step")
HOST_OVERHEAD = "host-overhead"
SCENARIOS = (*BANDWIDTH_SCENARIOS, HOST_OVERHEAD)
SCENARIO_TITLES = {
    "stats": "stats vs get_total_norm",
    "clip-noop": "clip, nothing to clip",
    "clip": "clip that clips",
    "adamw-step": "clip + fused AdamW step",
    HOST_OVERHEAD: "host overhead",
}
# The sides that are gradstats: their norm must be right before anything is timed (the others are
# baselines, whose errors are recorded).
OURS = ("gradstats", "planned")

# Gradients are N(0, GRAD_STD): a typical magnitude, far from float16 overflow and underflow.
GRAD_STD = 1e-2
# max_norm as a multiple of the gradients' norm: below 1 every call clips, above 1 none does.
CLIP_MULTIPLE = 0.5
NOCLIP_MULTIPLE = 2.0
# Each tensor of a gradient set starts on this boundary, as the CUDA caching allocator places
# separate allocations (and above the CPU allocator's 64 bytes), so vector loads stay aligned.
ALIGN_BYTES = 512
# A rotating pool never has fewer slots than this: a call never re-reads the previous call's data.
MIN_SLOTS = 2
# Nor more than this (each slot is a full set of tensors and parameters, slow to build for thousands
# of tiny tensors): smaller sets sweep a scratch buffer through the cache after each call instead.
MAX_SLOTS = 16
# Bytes a fused AdamW step must move per gradient byte: read param, grad, exp_avg, exp_avg_sq;
# write param, exp_avg, exp_avg_sq.
ADAMW_BYTES_PER_GRAD_BYTE = 7
# The optimizer's tensors per gradient: param, grad, exp_avg, exp_avg_sq.
ADAMW_TENSORS_PER_GRAD = 4
# The adamw-step scenario's pools of optimizer slots (gradstats; torch and the bare step), which
# share the flushing between them.
ADAMW_POOLS = 2
# Before timing, gradstats' norm must match the float64 norm of the same data this closely (it
# accumulates in float64). The baselines' errors are recorded, not enforced: on a CPU torch's
# per-tensor float32 sums drift on large tensors (2e-3 off on GPT-2's 38M-value embedding; 3% in
# float32 and bfloat16, 12% in float16, on Llama-1B's 262M-value one).
OURS_RTOL = 1e-5


class BenchError(RuntimeError):
    """The benchmark cannot run as asked, or its sides disagree (a benchmark of a wrong result)."""


def slot_count(slot_bytes: int, flush_bytes: int, minimum: int = MIN_SLOTS) -> int:
    """Slots whose total reaches flush_bytes (each slot is then evicted before it is used again),
    at most MAX_SLOTS."""
    return min(MAX_SLOTS, max(minimum, math.ceil(flush_bytes / max(slot_bytes, 1))))


def adamw_pair_bytes(grad_bytes: int) -> int:
    """The bytes of a slot of each of the adamw-step scenario's pools, for a gradient set."""
    return ADAMW_POOLS * ADAMW_TENSORS_PER_GRAD * grad_bytes


def make_pool(slots: int, slot_bytes: int, flush_bytes: int, evict: Callable[[], object]) -> Pool:
    """A pool of slots, sweeping the cache after each call when the slots alone cannot."""
    return Pool(slots, evict if slots * slot_bytes < flush_bytes else None)


class FlatSet:
    """Tensors of the preset's shapes laid out in one buffer, each on an ALIGN_BYTES boundary."""

    def __init__(self, preset: Preset, dtype: torch.dtype, device: torch.device) -> None:
        itemsize = torch.empty((), dtype=dtype).element_size()
        align = ALIGN_BYTES // itemsize
        self.offsets: list[int] = []
        end = 0
        for shape in preset.shapes:
            self.offsets.append(end)
            end += -(-math.prod(shape) // align) * align
        self.shapes = preset.shapes
        self.numel = end
        self.dtype = dtype
        self.device = device
        self.nbytes = preset.numel * itemsize  # the gradients' bytes, padding not counted

    def random(self, generator: torch.Generator) -> Tensor:
        flat = torch.empty(self.numel, dtype=self.dtype, device=self.device)
        return flat.normal_(0.0, GRAD_STD, generator=generator)

    def views(self, flat: Tensor) -> list[Tensor]:
        return [
            flat[offset : offset + math.prod(shape)].view(shape)
            for offset, shape in zip(self.offsets, self.shapes)
        ]


def as_params(grads: list[Tensor]) -> list[torch.nn.Parameter]:
    """Parameters carrying the given gradients, their data a broadcast scalar (no memory)."""
    params = []
    zeros = {}
    for g in grads:
        key = (g.dtype, g.device)
        if key not in zeros:
            zeros[key] = torch.zeros((), dtype=g.dtype, device=g.device)
        p = torch.nn.Parameter(zeros[key].expand(g.shape))
        p.grad = g
        params.append(p)
    return params


class GradPool:
    """A pristine gradient set and rotating copies of it, with parameters that carry each copy and
    a GradPlan of each copy's parameters."""

    def __init__(
        self, layout: FlatSet, pristine: Tensor, flush_bytes: int, evict: Callable[[], object]
    ) -> None:
        self.layout = layout
        self.pristine = pristine
        slots = slot_count(layout.nbytes, flush_bytes)
        self.flats = [pristine.clone() for _ in range(slots)]
        self.grads = [layout.views(flat) for flat in self.flats]
        self.params = [as_params(grads) for grads in self.grads]
        self.plans = [gradstats.GradPlan(params) for params in self.params]
        self.pool = make_pool(slots, layout.nbytes, flush_bytes, evict)

    def restore(self, slot: int) -> None:
        self.flats[slot].copy_(self.pristine)

    def changed(self, slot: int) -> bool:
        return not torch.equal(self.flats[slot], self.pristine)

    def builds(self) -> int:
        """The most times one of the plans was built: 1 when every planned call used its plan."""
        return max(plan.builds for plan in self.plans)


@dataclass
class Case:
    """What one row times: the sides, the bytes the gradstats side must move, notes."""

    scenario: str
    sides: list[Side]
    bytes_moved: int
    read_bytes: int  # one read of the gradients
    norm_errors: dict[str, float] = field(default_factory=dict)  # baseline: relative norm error


@dataclass
class Context:
    device: torch.device
    dtype: torch.dtype
    layout: FlatSet
    pristine: Tensor
    norm: float  # the pristine gradients' total L2 norm
    flush_bytes: int
    evict: Callable[[], object]  # sweeps the cache (for pools too small to)
    foreach: bool | None  # torch's foreach argument: True on GPUs, torch's default elsewhere
    floor: Side
    apex: Callable[[list[Tensor]], object] | None = None


def reference_norm(views: list[Tensor]) -> float:
    """The L2 norm of the tensors, in float64, one tensor at a time (bounded scratch memory)."""
    return math.sqrt(sum(float(v.double().square().sum()) for v in views))


def norm_error(what: str, side: str, norm: Tensor, reference: float) -> float:
    """The norm's error relative to the float64 norm; raises when gradstats' (plain or planned) is
    off."""
    value = float(norm)
    error = abs(value - reference) / reference if reference else abs(value)
    if side in OURS and not error <= OURS_RTOL:
        raise BenchError(
            f"{what}: {side} gives norm {value!r} where the float64 norm is {reference!r} "
            f"(relative error {error:.3g} > {OURS_RTOL:g}); not timing a wrong result"
        )
    return error


def _differs(what: str, detail: str) -> BenchError:
    return BenchError(
        f"{what}: GradPlan's result differs from the plain call's ({detail}), where it must be the"
        " same bitwise; not timing a wrong result"
    )


def check_planned_stats(what: str, plain: gradstats.GradStats, planned: gradstats.GradStats):
    """The planned statistics must be the plain call's, bitwise."""
    for name in ("total_norm", "norms", "counts"):
        ours, theirs = getattr(plain, name), getattr(planned, name)
        if not torch.equal(ours, theirs):
            raise _differs(what, f"{name} {ours.tolist()} and {theirs.tolist()}"[:200])


def stats_case(ctx: Context, grads: GradPool) -> Case:
    foreach = ctx.foreach
    ours = Side("gradstats", lambda s: gradstats.grad_stats(grads.grads[s]), grads.pool)
    planned = Side("planned", lambda s: grads.plans[s].grad_stats(), grads.pool)
    theirs = Side(
        "torch",
        lambda s: torch.nn.utils.get_total_norm(grads.grads[s], foreach=foreach),
        grads.pool,
    )
    plain_stats, planned_stats = ours.run(0), planned.run(0)
    for side, st in (("gradstats", plain_stats), ("planned", planned_stats)):
        norm_error("stats", side, st.total_norm, ctx.norm)  # type: ignore[attr-defined]
    check_planned_stats("stats", plain_stats, planned_stats)  # type: ignore[arg-type]
    errors = {"torch": norm_error("stats", "torch", theirs.run(0), ctx.norm)}  # type: ignore[arg-type]
    sides = [ours, planned, theirs, ctx.floor]
    if ctx.apex is not None:
        apex = ctx.apex
        errors["apex"] = norm_error("stats", "apex", apex(grads.grads[0])[0], ctx.norm)  # type: ignore[index]
        sides.append(Side("apex", lambda s: apex(grads.grads[s]), grads.pool))
    return Case("stats", sides, ctx.layout.nbytes, ctx.layout.nbytes, errors)


def max_norm_of(norm: float, clips: bool) -> float:
    """max_norm for gradients of this norm: below it when the call must clip, above it when not."""
    return norm * (CLIP_MULTIPLE if clips else NOCLIP_MULTIPLE)


def clip_sides(
    grads: GradPool, max_norm: float, clips: bool, foreach: bool | None
) -> tuple[Side, Side, Side]:
    """gradstats.clip_grad_norm_ (plain), GradPlan.clip_grad_norm_ (planned) and torch's, each
    restoring the gradients it clipped (untimed)."""
    restore = grads.restore if clips else None
    plain = Side(
        "gradstats",
        lambda s: gradstats.clip_grad_norm_(grads.params[s], max_norm),
        grads.pool,
        restore,
    )
    planned = Side(
        "planned", lambda s: grads.plans[s].clip_grad_norm_(max_norm), grads.pool, restore
    )
    theirs = Side(
        "torch",
        lambda s: torch.nn.utils.clip_grad_norm_(grads.params[s], max_norm, foreach=foreach),
        grads.pool,
        restore,
    )
    return plain, planned, theirs


def check_clip_sides(
    scenario: str, grads: GradPool, sides: tuple[Side, Side, Side], clips: bool, reference: float
) -> dict[str, float]:
    """Runs each side once, untimed, and stops the benchmark on a wrong result: a gradstats norm
    off the float64 norm, a planned result (norm or clipped gradients) not bitwise the plain one,
    or a side that clips when it should not (or does not when it should). Returns the baseline's
    norm error."""
    plain, planned, theirs = sides

    def run(side: Side, slot: int) -> Tensor:
        norm = side.run(slot)
        norm_error(scenario, side.name, norm, reference)  # type: ignore[arg-type]
        if grads.changed(slot) != clips:
            raise BenchError(
                f"{scenario}: {side.name} {'left' if clips else 'changed'} the gradients with "
                f"max_norm {max_norm_of(reference, clips):.4g} and norm {reference:.4g}; not "
                "timing this"
            )
        return norm  # type: ignore[return-value]

    # The plain and the planned call clip two copies of the same gradients (every pool has at
    # least two), compared afterwards.
    plain_norm, planned_norm = run(plain, 0), run(planned, 1)
    if not torch.equal(plain_norm, planned_norm):
        raise _differs(scenario, f"norm {plain_norm} and {planned_norm}")
    if not torch.equal(grads.flats[0], grads.flats[1]):
        raise _differs(scenario, "clipped gradients")
    grads.restore(1)
    grads.restore(0)
    error = norm_error(scenario, theirs.name, run(theirs, 0), reference)
    grads.restore(0)
    return {theirs.name: error}


def clip_case(ctx: Context, grads: GradPool, clips: bool) -> Case:
    scenario = "clip" if clips else "clip-noop"
    sides = clip_sides(grads, max_norm_of(ctx.norm, clips), clips, ctx.foreach)
    errors = check_clip_sides(scenario, grads, sides, clips, ctx.norm)
    # Bytes that must move: one read for the norm; one more read and a write only when clipping.
    read = ctx.layout.nbytes
    return Case(scenario, [*sides, ctx.floor], read * (3 if clips else 1), read, errors)


@dataclass
class OptimizerSlot:
    flat_grad: Tensor
    params: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer


def fused_adamw(params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, fused=True)


def optimizer_slots(ctx: Context, count: int, generator: torch.Generator) -> list[OptimizerSlot]:
    slots = []
    for _ in range(count):
        flat_param = ctx.layout.random(generator)
        flat_grad = ctx.pristine.clone()
        params = [torch.nn.Parameter(v) for v in ctx.layout.views(flat_param)]
        for p, g in zip(params, ctx.layout.views(flat_grad)):
            p.grad = g
        slots.append(OptimizerSlot(flat_grad, params, fused_adamw(params)))
    return slots


def adamw_case(ctx: Context, generator: torch.Generator) -> Case:
    max_norm = max_norm_of(ctx.norm, clips=True)
    foreach = ctx.foreach
    pair_bytes = adamw_pair_bytes(ctx.layout.nbytes)
    count = slot_count(pair_bytes, ctx.flush_bytes, 1)
    mine = optimizer_slots(ctx, count, generator)
    theirs = optimizer_slots(ctx, count, generator)
    wrapped = [gradstats.ClipGradOptimizer(slot.optimizer, max_norm) for slot in mine]

    def restore(slots: list[OptimizerSlot]) -> Callable[[int], None]:
        return lambda s: slots[s].flat_grad.copy_(ctx.pristine)

    def torch_step(s: int) -> None:
        torch.nn.utils.clip_grad_norm_(theirs[s].params, max_norm, foreach=foreach)
        theirs[s].optimizer.step()

    torch_pool = make_pool(count, pair_bytes, ctx.flush_bytes, ctx.evict)
    sides = [
        Side(
            "gradstats",
            lambda s: wrapped[s].step(),
            make_pool(count, pair_bytes, ctx.flush_bytes, ctx.evict),
            restore(mine),
        ),
        Side("torch", torch_step, torch_pool, restore(theirs)),
        Side("adamw", lambda s: theirs[s].optimizer.step(), torch_pool, restore(theirs)),
        ctx.floor,
    ]
    read = ctx.layout.nbytes
    return Case("adamw-step", sides, read * (1 + ADAMW_BYTES_PER_GRAD_BYTE), read)


def floor_side(device: torch.device, nbytes: int, generator: torch.Generator) -> tuple[Side, int]:
    """The bandwidth floor over nbytes: a float32 sum on a CPU (bytes read), a device-to-device
    copy on a GPU (bytes read plus bytes written). Returns the side and the bytes it moves."""
    numel = max(1, nbytes // torch.empty((), dtype=torch.float32).element_size())
    src = torch.empty(numel, device=device).normal_(generator=generator)
    if device.type == "cuda":
        dst = torch.empty_like(src)
        return Side("floor", lambda _: dst.copy_(src), Pool(1)), 2 * src.nbytes
    return Side("floor", lambda _: src.sum(), Pool(1)), src.nbytes


def apex_l2norm(device: torch.device) -> Callable[[list[Tensor]], object] | None:
    """NVIDIA apex's multi_tensor_l2norm where apex is installed with its CUDA extensions."""
    if device.type != "cuda":
        return None
    try:
        import amp_C  # type: ignore[import-not-found]
        from apex.multi_tensor_apply import multi_tensor_applier  # type: ignore[import-not-found]
    except ImportError:
        return None
    overflow = torch.zeros(1, dtype=torch.int32, device=device)
    return lambda tensors: multi_tensor_applier(
        amp_C.multi_tensor_l2norm, overflow, [tensors], False
    )
