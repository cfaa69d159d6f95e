"""Python face of the native ops (torch.ops.gradstats.*) and their fake implementations.

The fakes describe the outputs' shapes and dtypes without computing anything, which is what lets
the ops run under torch.compile, FakeTensor tracing and CUDA graph capture.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from gradstats._build import load_library

_C, BUILD_INFO = load_library()
# The messages of the scalar argument checks, from the one table in csrc/checks.cpp: the ops, their
# fakes and the Python API raise "gradstats: <text>; got <value>" alike.
MESSAGES: dict[str, str] = _C.argument_messages()
# The ops' layout constants, from the native headers (csrc/partial.h, csrc/feature_stats.h).
CONSTANTS: dict[str, Any] = _C.constants()

OP_NAMES = ("stats", "scale_", "feature_stats")
POLICIES = ("propagate", "skip", "zero")
SUPPORTED_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


def collect_grads(parameters: Sequence[Tensor]) -> list[Tensor]:
    """The defined .grad of each parameter, in order (natively: ~100 ns a parameter in Python)."""
    if torch.compiler.is_compiling():
        return [p.grad for p in parameters if p.grad is not None]
    return _C.collect_grads(list(parameters))


def grads_or_tensors(items: Sequence[Tensor]) -> list[Tensor]:
    """What grad_stats reads of each item: a Parameter, or a leaf tensor that requires grad, gives
    its .grad (nothing when it has none); any other tensor gives itself."""
    if torch.compiler.is_compiling():
        grads = [
            t.grad if isinstance(t, torch.nn.Parameter) or (t.requires_grad and t.is_leaf) else t
            for t in items
        ]
        return [g for g in grads if g is not None]
    return _C.grads_or_tensors(list(items), torch.nn.Parameter)


def device_groups(tensors: Sequence[Tensor]) -> list[list[int]]:
    """Indices of the tensors on each device, devices in order of first appearance."""
    if torch.compiler.is_compiling():
        groups: dict[torch.device, list[int]] = {}
        for i, t in enumerate(tensors):
            groups.setdefault(t.device, []).append(i)
        return list(groups.values())
    return _C.device_groups(list(tensors))


def grad_plan(params: Sequence[Tensor]) -> Any:
    """The native half of gradstats.GradPlan over these parameters (csrc/module.cpp)."""
    return _C.GradPlan(list(params))


def plan_stats(
    plan: Any, norm_type: float, max_norm: float, on_nonfinite: str, wide: bool, clip: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor, bool | None] | None:
    """The stats op on a grad_plan's gradients, as stats() returns it, and with clip the scale
    op after it (zeroing NaN/Inf under "zero"), then None; None when the plan does not serve them.
    A plan of DTensor gradients gives the statistics of their local tensors instead (float64, not
    clipped), then whether the local norm dtype is float64 (csrc/grad_plan.h)."""
    return plan.stats(norm_type, max_norm, on_nonfinite, wide, clip)


def nothing_to_clip_on_cpu(coef: Tensor) -> bool:
    """True when coef is a CPU tensor >= 1: then no gradient needs scaling, and skipping the scale
    op saves passing every tensor to it. Read natively; False on other devices (their scale kernel
    decides on the device) and while compiling."""
    if torch.compiler.is_compiling():
        return False
    return bool(_C.cpu_coef_at_least_one(coef))


def kernel_devices() -> dict[str, list[str]]:
    """For each op, the dispatch keys (CPU, CUDA) that have a kernel registered."""
    return {
        name: [
            key
            for key in ("CPU", "CUDA")
            if torch._C._dispatch_has_kernel_for_dispatch_key(f"gradstats::{name}", key)
        ]
        for name in OP_NAMES
    }


def _real_dtype(t: Tensor) -> torch.dtype:
    return t.real.dtype if t.is_complex() else t.dtype


def norm_dtype(tensors: Sequence[Tensor], wide: bool = False) -> torch.dtype:
    """The dtype of the stats op's norms and coefficient (csrc/checks.cpp norm_dtype): float64 when
    any tensor is float64 (or complex128) or when wide, else float32."""
    if wide or any(_real_dtype(t) == torch.float64 for t in tensors):
        return torch.float64
    return torch.float32


def argument_error(key: str, value: object) -> str:
    """The message of a failed scalar argument check (MESSAGES), its value as the ops print it."""
    try:
        shown = f"{float(value):g}"
    except (TypeError, ValueError):
        shown = repr(value)
    return f"gradstats: {MESSAGES[key]}; got {shown}"


def _check_tensors(tensors, op: str) -> None:
    """The fakes' share of the native argument checks (csrc/checks.cpp), with the same messages."""
    torch._check(len(tensors) > 0, lambda: f"gradstats.{op}: got an empty list of tensors")
    for i, t in enumerate(tensors):
        torch._check(
            _real_dtype(t) in SUPPORTED_DTYPES,
            lambda i=i, t=t: (
                f"gradstats.{op}: tensor {i} has dtype {t.dtype}; {MESSAGES['dtype']} "
                f"({MESSAGES['complex']})"
            ),
        )
        torch._check(
            t.device == tensors[0].device,
            lambda i=i, t=t: (
                f"gradstats.{op}: tensor {i} is on {t.device} but tensor 0 is on "
                f"{tensors[0].device}"
            ),
        )


def stats(
    tensors: Sequence[Tensor],
    norm_type: float,
    max_norm: float,
    on_nonfinite: str = "propagate",
    wide: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One pass over tensors of one device.

    Returns (total_norm, clip_coef, norms, counts): 0-dim, 0-dim, [n] in norm_dtype(tensors, wide),
    and int64 [3, n + 1] holding NaN, Inf and NaN + Inf counts per tensor with the totals in the
    last column.
    """
    # Statistics are not differentiated: no_grad keeps tensors that require grad (activations,
    # get_total_norm inputs) from giving outputs that pretend to be.
    with torch.no_grad():
        return torch.ops.gradstats.stats(
            list(tensors), float(norm_type), float(max_norm), on_nonfinite, wide
        )


@torch.library.register_fake("gradstats::stats")
def _stats_fake(tensors, norm_type, max_norm, on_nonfinite, wide=False):
    _check_tensors(tensors, "stats")
    torch._check(norm_type == norm_type, lambda: argument_error("norm_type", norm_type))
    torch._check(max_norm >= 0, lambda: argument_error("max_norm", max_norm))
    torch._check(on_nonfinite in POLICIES, lambda: argument_error("on_nonfinite", on_nonfinite))
    dtype = norm_dtype(tensors, wide)
    n = len(tensors)
    like = tensors[0]
    return (
        like.new_empty((), dtype=dtype),
        like.new_empty((), dtype=dtype),
        like.new_empty((n,), dtype=dtype),
        like.new_empty((3, n + 1), dtype=torch.int64),
    )


def scale_(tensors: Sequence[Tensor], coef: Tensor, zero_nonfinite: Tensor | None = None) -> None:
    """tensors *= coef in place (nothing touched when coef >= 1); optionally zeroes NaN/Inf
    elements of the tensors whose count in zero_nonfinite is positive."""
    torch.ops.gradstats.scale_(list(tensors), coef, zero_nonfinite)


@torch.library.register_fake("gradstats::scale_")
def _scale_fake(tensors, coef, zero_nonfinite=None):
    _check_tensors(tensors, "scale_")
    torch._check(
        coef.numel() == 1 and coef.is_floating_point(),
        lambda: "gradstats.scale_: coef must hold one floating-point value",
    )
    torch._check(
        coef.device == tensors[0].device,
        lambda: (
            f"gradstats.scale_: coef is on {coef.device} but the tensors are on {tensors[0].device}"
        ),
    )


# Rows of feature_stats' output (csrc/feature_stats.h): the additive ones first, then the extremes,
# the smallest stored as -min, so that several calls combine with one add and one maximum.
FEATURE_ROWS: tuple[str, ...] = tuple(CONSTANTS["feature_rows"])
FEATURE_ADDITIVE_ROWS: int = CONSTANTS["feature_additive_rows"]
# The rows of the NaN and the Inf counts, and of -min and max (whose largest is the largest |x|).
FEATURE_NONFINITE_ROWS = slice(FEATURE_ROWS.index("nan"), FEATURE_ROWS.index("inf") + 1)
FEATURE_EXTREME_ROWS = slice(FEATURE_ADDITIVE_ROWS, len(FEATURE_ROWS))


def feature_stats(input: Tensor, dim: int) -> Tensor:
    """Per-feature statistics of one dense input in one pass, feature dimension `dim`: float64
    [7, input.size(dim)] with the rows of FEATURE_ROWS (finite count, sum, sum of squares, NaN
    count, Inf count, -min and max of the finite values; -inf where a feature has none)."""
    with torch.no_grad():
        return torch.ops.gradstats.feature_stats(input, int(dim))


@torch.library.register_fake("gradstats::feature_stats")
def _feature_stats_fake(input, dim):
    torch._check(
        input.dtype in SUPPORTED_DTYPES,
        lambda: f"gradstats.feature_stats: the input has dtype {input.dtype}; {MESSAGES['dtype']}",
    )
    torch._check(input.dim() >= 1, lambda: "gradstats.feature_stats: the input is 0-dim")
    torch._check(
        -input.dim() <= dim < input.dim(),
        lambda: f"gradstats.feature_stats: dim {dim} is out of range for {input.dim()} dimensions",
    )
    return input.new_empty((len(FEATURE_ROWS), input.shape[dim]), dtype=torch.float64)
