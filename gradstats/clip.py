"""Drop-in replacements for the torch.nn.utils clipping functions, on the fused ops.

Same signatures and return conventions as torch (2.6+). Differences, on purpose:
- the returned norm is float32 (float64 if any gradient is float64) even for float16/bfloat16
  gradients, so it cannot overflow; the gradients are then clipped, where torch zeroes them;
- when nothing needs clipping (coefficient >= 1) the gradients are not touched at all;
- `foreach` is accepted and ignored: one fused launch per device covers every dtype;
- keyword-only `on_nonfinite` chooses what NaN/Inf gradients do;
- DTensor gradients (FSDP2, tensor parallel) give the global norm by themselves, and keyword-only
  `process_group` makes it global over gradients split across ranks (gradstats.distributed).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from gradstats import ops
from gradstats.distributed import local_tensors
from gradstats.stats import (
    CLIP_EPS,
    NONFINITE_ROW,
    GradStats,
    TensorOrTensors,
    as_tensor_list,
    check_max_norm,
    check_norm_type,
    collect_grads,
    compute,
)

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

ON_NONFINITE = ("propagate", "skip", "zero", "error")
_NAMED_AT_MOST = 10


def check_on_nonfinite(on_nonfinite: str) -> str:
    if on_nonfinite not in ON_NONFINITE:
        raise ValueError(f"on_nonfinite must be one of {ON_NONFINITE}; got {on_nonfinite!r}")
    return on_nonfinite


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
            f"{int(counts[0, i])} NaN, {int(counts[1, i])} Inf"
        )
    if len(bad) > _NAMED_AT_MOST:
        lines.append(f"  ... and {len(bad) - _NAMED_AT_MOST} more")
    # With a process_group the totals are global but plain tensors' counts are this rank's.
    elsewhere = int(all_counts[NONFINITE_ROW, -1]) - int(counts[NONFINITE_ROW].sum())
    if elsewhere > 0:
        lines.append(f"  and {elsewhere} NaN/Inf elements in the gradients of other ranks")
    return "\n".join(lines)


def raise_if_nonfinite(st: GradStats, tensors: list[Tensor], norm_type: float, names=None) -> None:
    """The opt-in sync of error_if_nonfinite / on_nonfinite="error"; raises before any change."""
    if int(st.nonfinite_count) == 0:
        return
    raise RuntimeError(
        f"The total norm of order {norm_type} for gradients from `parameters` is non-finite, so "
        f"it cannot be clipped. {nonfinite_report(st, tensors, names)}\n"
        "The gradients were left untouched. To scale them by the non-finite norm anyway, set "
        "error_if_nonfinite=False; on_nonfinite='skip' leaves them as they are and "
        "on_nonfinite='zero' zeroes the NaN/Inf elements and clips the rest."
    )


def apply_clip(tensors: list[Tensor], coef: Tensor, zero_counts: Tensor | None = None) -> None:
    """Scales the tensors by coef in place, one fused launch per device.

    With zero_counts (per-tensor non-finite counts), the NaN/Inf elements of the tensors that hold
    any are set to 0. DTensors are scaled through their local shards.
    """
    if zero_counts is None and _nothing_to_clip_on_cpu(coef):
        return  # the coefficient is global: no device has anything to scale
    tensors = local_tensors(tensors)
    groups = ops.device_groups(tensors)
    for idx in groups:
        device = tensors[idx[0]].device
        counts = zero_counts
        if counts is not None and len(groups) > 1:
            counts = counts[torch.tensor(idx, device=counts.device)].to(device)
        ops.scale_([tensors[i] for i in idx], coef.to(device, non_blocking=True), counts)


def _nothing_to_clip_on_cpu(coef: Tensor) -> bool:
    """On the CPU the host reads the coefficient for free (no device to wait for), and skipping the
    call saves passing every tensor to an op that would return at once. Elsewhere the scale kernel
    decides on the device."""
    return coef.device.type == "cpu" and not torch.compiler.is_compiling() and coef.item() >= 1.0


def clip_grad_norm_(
    parameters: TensorOrTensors,
    max_norm: float,
    norm_type: float | str = 2.0,
    error_if_nonfinite: bool = False,
    foreach: bool | None = None,
    *,
    on_nonfinite: str = "propagate",
    process_group: ProcessGroup | None = None,
) -> Tensor:
    """Clips the gradient norm of an iterable of parameters in place; returns the total norm.

    on_nonfinite: "propagate" (torch's outcome: a NaN/Inf norm, gradients scaled by it), "skip"
    (gradients left untouched when anything is non-finite), "zero" (NaN/Inf elements set to 0, the
    rest clipped by the norm of the finite values), "error" (raise naming the offending tensors,
    gradients untouched). error_if_nonfinite=True is "error".

    process_group: the ranks over which the gradients are split (ZeRO-style slices, parameters
    split across ranks); every rank gets the global norm and clips by the same coefficient, and a
    NaN on any rank is seen by all. Not needed for DTensor (FSDP2) or replicated (DDP) gradients.
    """
    del foreach  # one fused launch per device replaces torch's foreach kernels
    policy = "error" if error_if_nonfinite else check_on_nonfinite(on_nonfinite)
    p = check_norm_type(norm_type)
    limit = check_max_norm(max_norm)
    grads = collect_grads(parameters)
    if not grads and process_group is None:
        return torch.tensor(0.0)
    kernel_policy = "propagate" if policy == "error" else policy
    st = compute(grads, p, limit, kernel_policy, process_group, per_tensor=False)
    if policy == "error":
        raise_if_nonfinite(st, grads, p)
    apply_clip(grads, st.clip_coef, st.nonfinite if policy == "zero" else None)
    return st.total_norm


def get_total_norm(
    tensors: TensorOrTensors,
    norm_type: float | str = 2.0,
    error_if_nonfinite: bool = False,
    foreach: bool | None = None,
    *,
    process_group: ProcessGroup | None = None,
) -> Tensor:
    """The norm of all the given tensors (e.g. gradients) together, as one vector.

    With process_group (or DTensors), the norm of the tensors of every rank together.
    """
    del foreach
    p = check_norm_type(norm_type)
    items = as_tensor_list(tensors)
    if not items and process_group is None:
        return torch.tensor(0.0)
    st = compute(items, p, float("inf"), "propagate", process_group, per_tensor=False)
    if error_if_nonfinite:
        raise_if_nonfinite(st, items, p)
    return st.total_norm


def clip_grads_with_norm_(
    parameters: TensorOrTensors,
    max_norm: float,
    total_norm: Tensor,
    foreach: bool | None = None,
) -> None:
    """Scales the gradients by min(1, max_norm / (total_norm + 1e-6)), a norm computed earlier.

    Takes no process_group: a total_norm from get_total_norm(..., process_group=...) is already
    global, and each rank scales its own part (DTensors: their local shards).
    """
    del foreach
    limit = check_max_norm(max_norm)
    grads = collect_grads(parameters)
    if not grads:
        return
    coef = torch.clamp(torch.reciprocal(total_norm + CLIP_EPS) * limit, max=1.0)
    apply_clip(grads, coef)


def clip_grad_value_(
    parameters: TensorOrTensors, clip_value: float, foreach: bool | None = None
) -> None:
    """Clamps every gradient into [-clip_value, clip_value] in place (NaN stays NaN, as torch)."""
    del foreach
    value = float(clip_value)
    groups: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
    for g in collect_grads(parameters):
        groups.setdefault((g.device, g.dtype), []).append(g)
    for group in groups.values():
        torch._foreach_clamp_min_(group, -value)
        torch._foreach_clamp_max_(group, value)
