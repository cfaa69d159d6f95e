"""L1: the rules every public function shares, each written once.

GradStats and its counts layout, the clip coefficient formula, the argument checks and their
messages, the local (one process) statistics over any mix of devices, the in-place clip, and the
report of which tensors hold NaN/Inf. Builds on gradstats.ops (L0) only; gradstats.distributed (L2)
builds on this module, the public functions (L3, L4) on both.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Union

import torch
import torch.distributed as dist
from torch import Tensor

from gradstats import ops

if dist.is_available():
    from torch.distributed.tensor import DTensor

TensorOrTensors = Union[Tensor, Iterable[Tensor]]

# Rows of GradStats.counts (the stats op's layout, csrc/partial.h kNanRow...).
NAN_ROW: int = ops.CONSTANTS["nan_row"]
INF_ROW: int = ops.CONSTANTS["inf_row"]
NONFINITE_ROW: int = ops.CONSTANTS["nonfinite_row"]
# torch.nn.utils.clip_grad_norm_ adds this to the norm before dividing (csrc/partial.h: kClipEps).
CLIP_EPS: float = ops.CONSTANTS["clip_eps"]
# What NaN/Inf gradients do. The kernels know the first three; "error" is "propagate" plus a raise.
ON_NONFINITE = ("propagate", "skip", "zero", "error")
# A message names at most this many tensors.
_NAMED_AT_MOST = 10


@dataclass(frozen=True)
class GradStats:
    """Statistics of a list of tensors, all left on the device (reading them never syncs).

    total_norm: 0-dim, float32 (float64 when any tensor is float64); NaN if any element is NaN,
        else Inf if any is Inf (as torch computes it), unless on_nonfinite="zero".
    clip_coef: 0-dim, min(1, max_norm / (total_norm + 1e-6)); None when no max_norm was given.
    norms: per-tensor norms [n]; None when per_tensor=False.
    counts: int64 [3, n + 1]: NaN, Inf and NaN + Inf counts per tensor, totals in the last column.
    """

    total_norm: Tensor
    clip_coef: Tensor | None
    norms: Tensor | None
    counts: Tensor
    norm_type: float

    @property
    def num_tensors(self) -> int:
        return self.counts.shape[1] - 1

    @property
    def nan_count(self) -> Tensor:
        """Total number of NaN elements (0-dim int64)."""
        return self.counts[NAN_ROW, -1]

    @property
    def inf_count(self) -> Tensor:
        """Total number of +-Inf elements (0-dim int64)."""
        return self.counts[INF_ROW, -1]

    @property
    def nonfinite_count(self) -> Tensor:
        """Total number of NaN and Inf elements (0-dim int64)."""
        return self.counts[NONFINITE_ROW, -1]

    @property
    def nonfinite(self) -> Tensor:
        """Per-tensor NaN + Inf counts (int64 [n])."""
        return self.counts[NONFINITE_ROW, :-1]

    @property
    def any_nonfinite(self) -> Tensor:
        """Whether any element is NaN/Inf or the total norm is not finite (0-dim bool): what
        on_nonfinite="skip" skips and "error" raises on. The norm alone can be Inf for finite
        gradients, when it exceeds the float32 range (3.4e38)."""
        return (self.nonfinite_count > 0) | ~torch.isfinite(self.total_norm)

    def trimmed(self, with_clip_coef: bool, per_tensor: bool) -> GradStats:
        """These statistics without the coefficient and/or the per-tensor norms (grad_stats'
        max_norm=None, per_tensor=False)."""
        coef = self.clip_coef if with_clip_coef else None
        return replace(self, clip_coef=coef, norms=self.norms if per_tensor else None)

    @property
    def nan_counts(self) -> Tensor:
        return self.counts[NAN_ROW, :-1]

    @property
    def inf_counts(self) -> Tensor:
        return self.counts[INF_ROW, :-1]

    def to_dict(self, names: Sequence[str] | None = None) -> dict:
        """Python numbers for logging. This is the one place that copies to the host (one sync)."""
        n = self.num_tensors
        names = [str(i) for i in range(n)] if names is None else list(names)
        if len(names) != n:
            raise ValueError(f"to_dict: got {len(names)} names for {n} tensors")
        device = self.total_norm.device
        parts = [self.total_norm.reshape(1).double()]
        if self.clip_coef is not None:
            parts.append(self.clip_coef.reshape(1).to(device, torch.float64))
        if self.norms is not None:
            parts.append(self.norms.to(device, torch.float64))
        parts.append(self.counts.reshape(-1).to(device, torch.float64))
        values = torch.cat(parts).tolist()
        out: dict = {"total_norm": values.pop(0)}
        if self.clip_coef is not None:
            out["clip_coef"] = values.pop(0)
        if self.norms is not None:
            out["norms"] = dict(zip(names, values[:n]))
            values = values[n:]
        rows = [[int(v) for v in values[r * (n + 1) : (r + 1) * (n + 1)]] for r in range(3)]
        out["nan_count"], out["inf_count"] = rows[NAN_ROW][n], rows[INF_ROW][n]
        out["nonfinite"] = dict(zip(names, rows[NONFINITE_ROW][:n]))
        return out


def empty_stats(norm_type: float, with_clip_coef: bool, per_tensor: bool) -> GradStats:
    """The statistics of no tensors at all: a zero norm, nothing to clip, no NaN/Inf."""
    return GradStats(
        torch.zeros(()),
        torch.ones(()) if with_clip_coef else None,
        torch.zeros(0) if per_tensor else None,
        torch.zeros(3, 1, dtype=torch.int64),
        norm_type,
    )


# ------------------------------------------------------------------------------ argument checks


def check_norm_type(norm_type: float | str) -> float:
    """Any p torch.linalg.vector_norm takes: p > 0, 0, p < 0, inf, -inf; not NaN."""
    try:
        p = float(norm_type)
    except (TypeError, ValueError):
        p = math.nan
    if math.isnan(p):
        raise ValueError(ops.argument_error("norm_type", norm_type))
    return p


def check_max_norm(max_norm: float | Tensor) -> float:
    try:
        value = float(max_norm)
    except (TypeError, ValueError):
        value = math.nan
    if not value >= 0:
        raise ValueError(ops.argument_error("max_norm", max_norm))
    return value


def check_on_nonfinite(on_nonfinite: str) -> str:
    if on_nonfinite not in ON_NONFINITE:
        raise ValueError(f"on_nonfinite must be one of {ON_NONFINITE}; got {on_nonfinite!r}")
    return on_nonfinite


def check_int(name: str, value: int | None, low: int, *, optional: bool = False) -> None:
    """An int (not a bool) >= low; None too when optional."""
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        allowed = "None or an integer" if optional else "an integer"
        raise ValueError(f"{name} must be {allowed} >= {low}; got {value!r}")


def clip_arguments(
    max_norm: float | Tensor, norm_type: float | str, error_if_nonfinite: bool, on_nonfinite: str
) -> tuple[str, float, float]:
    """clip_grad_norm_'s arguments, checked: (the policy, p, max_norm). error_if_nonfinite=True
    makes the policy "error"."""
    policy = check_on_nonfinite(on_nonfinite)
    return (
        "error" if error_if_nonfinite else policy,
        check_norm_type(norm_type),
        check_max_norm(max_norm),
    )


def stats_arguments(norm_type: float | str, max_norm: float | None) -> tuple[float, float]:
    """grad_stats' arguments, checked: (p, the limit: inf without max_norm)."""
    return check_norm_type(norm_type), math.inf if max_norm is None else check_max_norm(max_norm)


def kernel_policy(on_nonfinite: str) -> str:
    """The kernels' policy for a public one: "error" computes as "propagate", then raises."""
    return "propagate" if on_nonfinite == "error" else on_nonfinite


# ---------------------------------------------------------------------------- the one formula


def clip_coef(total_norm: Tensor, max_norm: float | Tensor, skip: Tensor | None = None) -> Tensor:
    """min(1, max_norm / (total_norm + 1e-6)) on the norm's device and in its dtype, computed as
    torch computes it (the reciprocal, then the product), so that both clip by the same factor; a
    NaN norm gives NaN, as in torch. Where `skip` (a 0-dim bool) is set, 1: clip nothing.

    The kernels compute the same in csrc/partial.h (clip_coefficient) for one device's call.
    """
    limit = max_norm.to(total_norm.dtype) if isinstance(max_norm, Tensor) else max_norm
    coef = torch.clamp(torch.reciprocal(total_norm + CLIP_EPS) * limit, max=1.0)
    if skip is None:
        return coef
    return torch.where(skip, torch.ones_like(coef), coef)


def narrowed_stats(
    exact_total: Tensor,
    norms: Tensor | None,
    counts: Tensor,
    norm_type: float,
    dtype: torch.dtype,
    max_norm: float | Tensor,
    skips: bool,
) -> GradStats:
    """Statistics whose total was combined in float64 (over devices or ranks, or with a loss
    scale taken out), narrowed to the norm dtype: the coefficient comes from the exact total, and
    is 1 where skips and any_nonfinite (what on_nonfinite="skip" skips)."""
    narrow_norms = None if norms is None else norms.to(dtype)
    st = GradStats(exact_total.to(dtype), None, narrow_norms, counts, norm_type)
    skip = st.any_nonfinite if skips else None
    return replace(st, clip_coef=clip_coef(exact_total, max_norm, skip).to(dtype))


# ----------------------------------------------------------------------- tensors and devices


def as_tensor_list(tensors: TensorOrTensors) -> list[Tensor]:
    return [tensors] if isinstance(tensors, Tensor) else list(tensors)


def collect_grads(parameters: TensorOrTensors) -> list[Tensor]:
    """The .grad of each parameter that has one, as torch.nn.utils does."""
    return ops.collect_grads(as_tensor_list(parameters))


def distributed_active() -> bool:
    """Whether torch.distributed is initialised (no DTensor or process group exists before)."""
    return dist.is_available() and dist.is_initialized()


def local_tensors(tensors: list[Tensor]) -> list[Tensor]:
    """The local shard of each DTensor, other tensors as they are: what clipping scales in place.
    Read from the DTensor itself: to_local() is an autograd Function (tens of microseconds a
    call), and gradients need no autograd."""
    if not distributed_active():
        return tensors
    return [t._local_tensor if isinstance(t, DTensor) else t for t in tensors]


def group_by_device_and_dtype(tensors: Sequence[Tensor]) -> list[list[Tensor]]:
    """The tensors grouped by (device, dtype), groups in order of first appearance: the lists that
    torch's foreach ops take."""
    groups: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.device, t.dtype), []).append(t)
    return list(groups.values())


def _runs(indices: list[int]) -> list[slice]:
    """Ascending indices as slices of consecutive ones: a device's tensors are usually one or a few
    runs of the list, and slices move data between devices without an index tensor (whose copy to
    the device would wait for the host, and would not survive CUDA graph capture)."""
    runs: list[slice] = []
    start = prev = indices[0]
    for i in indices[1:]:
        if i != prev + 1:
            runs.append(slice(start, prev + 1))
            start = i
        prev = i
    runs.append(slice(start, prev + 1))
    return runs


def _gather(values: Tensor, indices: list[int], device: torch.device) -> Tensor:
    """values[..., indices] (last dimension) on `device`, without an index tensor."""
    return torch.cat([values[..., run] for run in _runs(indices)], dim=-1).to(device)


def _scatter(out: Tensor, indices: list[int], values: Tensor) -> None:
    """out[..., indices] = values (last dimension), without an index tensor."""
    at = 0
    for run in _runs(indices):
        size = run.stop - run.start
        out[..., run].copy_(values[..., at : at + size])
        at += size


# ------------------------------------------------------------------------- local statistics


def local_stats(
    tensors: Sequence[Tensor],
    norm_type: float,
    max_norm: float,
    on_nonfinite: str,
    wide: bool = False,
) -> GradStats:
    """The statistics of this process's tensors: the fused op once per device, the devices combined
    (one call for one device). on_nonfinite is a kernel policy (propagate, skip, zero); wide gives
    float64 norms and coefficient whatever the tensors (ops.norm_dtype)."""
    groups = ops.device_groups(tensors)
    if len(groups) == 1:
        total, coef, norms, counts = ops.stats(tensors, norm_type, max_norm, on_nonfinite, wide)
        return GradStats(total, coef, norms, counts, norm_type)
    # Each device's statistics in float64: a device whose float32 norm would overflow stays exact.
    results = [
        ops.stats([tensors[i] for i in idx], norm_type, max_norm, on_nonfinite, wide=True)
        for idx in groups
    ]
    first = results[0][0].device
    n = len(tensors)
    norms = torch.empty(n, dtype=torch.float64, device=first)
    counts = torch.zeros(3, n + 1, dtype=torch.int64, device=first)
    device_totals = []
    for idx, (total, _, dev_norms, dev_counts) in zip(groups, results):
        _scatter(norms, idx, dev_norms.to(first))
        _scatter(counts[:, :-1], idx, dev_counts[:, :-1].to(first))
        counts[:, -1] += dev_counts[:, -1].to(first)
        device_totals.append(total.to(first))
    exact = norm_of_norms(torch.stack(device_totals), norm_type)
    dtype = ops.norm_dtype(tensors, wide)
    return narrowed_stats(exact, norms, counts, norm_type, dtype, max_norm, on_nonfinite == "skip")


def norm_of_norms(norms: Tensor, norm_type: float) -> Tensor:
    """The norm of the union of disjoint parts, from the parts' norms (float64; NaN propagates):
    what the kernels compute over all elements, when the elements are on several devices or ranks.

    p > 0 and p < 0 are summed on the scale of the part that dominates (the largest norm, or the
    smallest for p < 0), so that no power overflows or underflows whatever the norms or p. The
    0 "norm" of parts is the sum of their counts of tensors with a nonzero norm (the kernels' total
    for p = 0); inf and -inf take the max and the min.
    """
    values = norms.double()
    if norm_type == 0:
        return values.sum()
    if math.isinf(norm_type):
        return values.amax() if norm_type > 0 else values.amin()
    dominant = values.amax() if norm_type > 0 else values.amin()
    usable = (dominant > 0) & torch.isfinite(dominant)
    scale = torch.where(usable, dominant, torch.ones_like(dominant))
    total = (values / scale).pow(norm_type).sum().pow(1.0 / norm_type) * scale
    # A dominant Inf (p > 0) or 0 (p < 0, a zero element somewhere) decides the norm by itself.
    return torch.where(usable | torch.isnan(dominant), total, dominant)


# ------------------------------------------------------------------------------- clipping


def apply_clip(tensors: list[Tensor], coef: Tensor, zero_counts: Tensor | None = None) -> None:
    """Scales the tensors by coef in place, one fused launch per device.

    With zero_counts (per-tensor non-finite counts), the NaN/Inf elements of the tensors that hold
    any are set to 0. DTensors are scaled through their local shards.
    """
    if zero_counts is None and ops.nothing_to_clip_on_cpu(coef):
        return  # the coefficient is global: no device has anything to scale
    tensors = local_tensors(tensors)
    groups = ops.device_groups(tensors)
    for idx in groups:
        device = tensors[idx[0]].device
        counts = zero_counts
        if counts is not None and len(groups) > 1:
            counts = _gather(counts, idx, device)
        # Toward the CPU the copy must be a blocking one: its scale reads the value at once, and a
        # non-blocking copy into pinned memory may not have landed yet (toward a GPU the copy is
        # ordered on the stream before the scale kernel).
        here = coef.to(device, non_blocking=device.type != "cpu")
        ops.scale_([tensors[i] for i in idx], here, counts)


# ------------------------------------------------------------------------ non-finite report


def nonfinite_report(st: GradStats, tensors: list[Tensor], names=None) -> str:
    """Lines naming the tensors that hold NaN/Inf with their counts (syncs: only for errors)."""
    all_counts = st.counts.cpu()
    counts = all_counts[:, :-1]
    bad = torch.nonzero(counts[NONFINITE_ROW]).flatten().tolist()
    lines = [f"{len(bad)} of {len(tensors)} tensors hold NaN or Inf:"]
    for i in bad[:_NAMED_AT_MOST]:
        label = names[i] if names is not None else f"tensor {i}"
        t = tensors[i]
        lines.append(
            f"  {label} (shape {tuple(t.shape)}, {t.dtype}): "
            f"{int(counts[NAN_ROW, i])} NaN, {int(counts[INF_ROW, i])} Inf"
        )
    if len(bad) > _NAMED_AT_MOST:
        lines.append(f"  ... and {len(bad) - _NAMED_AT_MOST} more")
    # With a process_group the totals are global but plain tensors' counts are this rank's.
    elsewhere = int(all_counts[NONFINITE_ROW, -1]) - int(counts[NONFINITE_ROW].sum())
    if elsewhere > 0:
        lines.append(f"  and {elsewhere} NaN/Inf elements in the gradients of other ranks")
    if int(all_counts[NONFINITE_ROW, -1]) == 0:
        lines.append(
            f"  every element is finite, but their norm ({float(st.total_norm)}) is beyond the "
            f"range of {st.total_norm.dtype} (3.4e38 for float32)"
        )
    return "\n".join(lines)


def raise_if_nonfinite(
    st: GradStats, tensors: list[Tensor], norm_type: float, names=None, *, norm_only: bool = False
) -> None:
    """The opt-in sync of on_nonfinite="error" (any NaN/Inf element or a non-finite norm) and of
    error_if_nonfinite (norm_only: torch's rule, a NaN/Inf total norm); raises before any change."""
    found = ~torch.isfinite(st.total_norm) if norm_only else st.any_nonfinite
    if not bool(found):
        return
    raise RuntimeError(
        f"The total norm of order {norm_type} for gradients from `parameters` is non-finite, so "
        f"it cannot be clipped. {nonfinite_report(st, tensors, names)}\n"
        "The gradients were left untouched. To scale them by the non-finite norm anyway, set "
        "error_if_nonfinite=False; on_nonfinite='skip' leaves them as they are and "
        "on_nonfinite='zero' zeroes the NaN/Inf elements and clips the rest."
    )
