"""L3: drop-in replacements for the torch.nn.utils clipping functions, on the fused ops.

Same signatures and return conventions as torch (2.6+). Differences, on purpose:
- the returned norm is float32 (float64 if any gradient is float64) even for float16/bfloat16
  gradients, so it cannot overflow; the gradients are then clipped, where torch zeroes them;
- when nothing needs clipping (coefficient >= 1) the gradients are not touched at all;
- `foreach` is accepted and ignored: one fused launch per device covers every dtype;
- keyword-only `on_nonfinite` chooses what NaN/Inf gradients do, and `return_stats` returns the
  pass's GradStats (norms, NaN/Inf counts, coefficient) instead of the norm;
- DTensor gradients (FSDP2, tensor parallel) give the global norm by themselves, and keyword-only
  `process_group` makes it global over gradients split across ranks (gradstats.distributed).
"""

from __future__ import annotations

import math
import types
import warnings
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from gradstats._core import (
    GradStats,
    TensorOrTensors,
    apply_clip,
    as_tensor_list,
    check_max_norm,
    check_norm_type,
    clip_arguments,
    clip_coef,
    collect_grads,
    empty_stats,
    group_by_device_and_dtype,
    kernel_policy,
    raise_if_nonfinite,
)
from gradstats.distributed import reduced_statistics, statistics

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

# torch.nn.utils.clip_grad_norm_'s warning, word for word.
EMPTY_GENERATOR = "`parameters` is an empty generator, no gradient clipping will occur."


def clip_grad_norm_(
    parameters: TensorOrTensors,
    max_norm: float,
    norm_type: float | str = 2.0,
    error_if_nonfinite: bool = False,
    foreach: bool | None = None,
    *,
    on_nonfinite: str = "propagate",
    process_group: ProcessGroup | None = None,
    return_stats: bool = False,
) -> Tensor | GradStats:
    """Clips the gradient norm of an iterable of parameters in place; returns the total norm.

    on_nonfinite: "propagate" (torch's outcome: a NaN/Inf norm, gradients scaled by it), "skip"
    (gradients left untouched when anything is non-finite), "zero" (NaN/Inf elements set to 0, the
    rest clipped by the norm of the finite values), "error" (raise naming the offending tensors,
    gradients untouched). Non-finite means a NaN/Inf element or a non-finite total norm (finite
    float32 gradients whose norm exceeds 3.4e38; the coefficient is still exact, so "propagate"
    clips them). error_if_nonfinite=True raises, gradients untouched, on torch's rule: the total
    norm is NaN or Inf.

    process_group: the ranks over which the gradients are split (ZeRO-style slices, parameters
    split across ranks); every rank gets the global norm and clips by the same coefficient, and a
    NaN on any rank is seen by all. Not needed for DTensor (FSDP2) or replicated (DDP) gradients.

    return_stats: return the GradStats of the same pass instead of the norm: total_norm (before
    clipping, the norm returned otherwise), clip_coef (the factor applied; 1 where nothing was
    scaled), per-tensor norms and NaN/Inf counts of the parameters that have a gradient, in order.
    Nothing is synchronised: the fields are tensors on the gradients' device.
    """
    del foreach  # one fused launch per device replaces torch's foreach kernels
    policy, p, limit = clip_arguments(max_norm, norm_type, error_if_nonfinite, on_nonfinite)
    if isinstance(parameters, types.GeneratorType):
        parameters = list(parameters)
        if not parameters:
            warnings.warn(EMPTY_GENERATOR, stacklevel=2)
    grads = collect_grads(parameters)
    if not grads and process_group is None:
        return empty_stats(p, True, True) if return_stats else torch.tensor(0.0)
    kernel = kernel_policy(policy)
    st = None if process_group is not None else reduced_statistics(grads, p, limit, kernel)
    if st is None:
        st = statistics(grads, p, limit, kernel, process_group, per_tensor=return_stats)
    if policy == "error":
        raise_if_nonfinite(st, grads, p, norm_only=error_if_nonfinite)
    apply_clip(grads, st.clip_coef, st.nonfinite if policy == "zero" else None)
    return st if return_stats else st.total_norm


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
    st = None if process_group is not None else reduced_statistics(items, p, math.inf, "propagate")
    if st is None:
        st = statistics(items, p, math.inf, "propagate", process_group, per_tensor=False)
    if error_if_nonfinite:
        raise_if_nonfinite(st, items, p, norm_only=True)
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
    apply_clip(grads, clip_coef(total_norm, limit))


def clip_grad_value_(
    parameters: TensorOrTensors, clip_value: float, foreach: bool | None = None
) -> None:
    """Clamps every gradient into [-clip_value, clip_value] in place (NaN stays NaN, as torch)."""
    del foreach
    value = float(clip_value)
    for group in group_by_device_and_dtype(collect_grads(parameters)):
        torch._foreach_clamp_min_(group, -value)
        torch._foreach_clamp_max_(group, value)
