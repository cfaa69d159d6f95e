"""L3: grad_stats() and count_nonfinite(), norms and NaN/Inf counts from one fused pass."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from gradstats import ops
from gradstats._core import (
    NONFINITE_ROW,
    GradStats,
    TensorOrTensors,
    as_tensor_list,
    empty_stats,
    stats_arguments,
)
from gradstats.distributed import reduced_statistics, statistics

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup


def grad_stats(
    parameters_or_tensors: TensorOrTensors,
    norm_type: float | str = 2.0,
    max_norm: float | None = None,
    per_tensor: bool = True,
    *,
    process_group: ProcessGroup | None = None,
) -> GradStats:
    """Norms, NaN/Inf counts and (with max_norm) the clip coefficient, from one fused pass.

    Parameters contribute their .grad (and are skipped without one); other tensors are read as
    they are. Nothing is synchronised: every field is a tensor on the gradients' device.

    DTensor gradients (FSDP2, tensor parallel) give global statistics by themselves; with
    process_group, the tensors are this rank's part of gradients split over its ranks (ZeRO-style
    slices, parameters split across ranks) and the totals are global, identical on every rank.
    Replicated (DDP) gradients need neither. See gradstats.distributed.
    """
    items = as_tensor_list(parameters_or_tensors)
    tensors = ops.grads_or_tensors(items)
    p, limit = stats_arguments(norm_type, max_norm)
    if not tensors and process_group is None:
        return empty_stats(p, max_norm is not None, per_tensor)
    st = None if process_group is not None else reduced_statistics(tensors, p, limit, "propagate")
    if st is None:
        st = statistics(tensors, p, limit, "propagate", process_group, per_tensor)
    return st.trimmed(max_norm is not None, per_tensor)


def count_nonfinite(tensors: TensorOrTensors) -> Tensor:
    """NaN + Inf counts of inputs, activations or losses, without a sync.

    A single tensor gives a 0-dim int64 count; a list gives an int64 tensor with one count per
    tensor (on the first tensor's device).
    """
    items = as_tensor_list(tensors)
    if not items:
        return torch.zeros(0, dtype=torch.int64)
    counts = statistics(items, math.inf, math.inf, "zero").counts[NONFINITE_ROW]
    return counts[0] if isinstance(tensors, Tensor) else counts[:-1]
