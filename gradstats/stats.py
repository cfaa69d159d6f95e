"""GradStats and grad_stats(): norms, NaN/Inf counts and clip coefficient from one fused pass."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Union

import torch
from torch import Tensor

from gradstats import ops

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

TensorOrTensors = Union[Tensor, Iterable[Tensor]]

NAN_ROW, INF_ROW, NONFINITE_ROW = 0, 1, 2
# torch.nn.utils.clip_grad_norm_ adds this to the norm before dividing (csrc/stats.h: kClipEps).
CLIP_EPS = 1e-6


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


def as_tensor_list(tensors: TensorOrTensors) -> list[Tensor]:
    return [tensors] if isinstance(tensors, Tensor) else list(tensors)


def collect_grads(parameters: TensorOrTensors) -> list[Tensor]:
    """The .grad of each parameter that has one, as torch.nn.utils does."""
    return ops.collect_grads(as_tensor_list(parameters))


def check_norm_type(norm_type: float | str) -> float:
    try:
        p = float(norm_type)
    except (TypeError, ValueError):
        p = math.nan
    if not p > 0:
        raise ValueError(
            f"norm_type must be > 0 or inf; got {norm_type!r} (0 and -inf are not supported)"
        )
    return p


def check_max_norm(max_norm: float | Tensor) -> float:
    value = float(max_norm)
    if math.isnan(value) or value < 0:
        raise ValueError(f"max_norm must be a non-negative number (or inf); got {max_norm!r}")
    return value


def compute(
    tensors: Sequence[Tensor],
    norm_type: float,
    max_norm: float,
    on_nonfinite: str,
    process_group: ProcessGroup | None = None,
    per_tensor: bool = True,
) -> GradStats:
    """The statistics of the tensors; global over the ranks for DTensors and with a process_group
    (gradstats.distributed, which leaves the per-tensor norms out when per_tensor is False)."""
    if process_group is not None or _distributed_active():
        # Imported here, not at the top: gradstats.distributed builds on this module.
        from gradstats import distributed

        return distributed.global_stats(
            tensors, norm_type, max_norm, on_nonfinite, process_group, per_tensor
        )
    return compute_local(tensors, norm_type, max_norm, on_nonfinite)


def _distributed_active() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def compute_local(
    tensors: Sequence[Tensor], norm_type: float, max_norm: float, on_nonfinite: str
) -> GradStats:
    """Runs the fused op once per device and combines the devices (a single call for one device)."""
    groups = ops.device_groups(tensors)
    if len(groups) == 1:
        total, coef, norms, counts = ops.stats(tensors, norm_type, max_norm, on_nonfinite)
        return GradStats(total, coef, norms, counts, norm_type)
    return _combine_devices(tensors, groups, norm_type, max_norm, on_nonfinite)


def _combine_devices(tensors, groups, norm_type, max_norm, on_nonfinite) -> GradStats:
    results = [
        ops.stats([tensors[i] for i in idx], norm_type, max_norm, on_nonfinite) for idx in groups
    ]
    first = results[0][0].device
    n = len(tensors)
    wide = any(r[0].dtype == torch.float64 for r in results)
    dtype = torch.float64 if wide else torch.float32
    norms = torch.empty(n, dtype=dtype, device=first)
    counts = torch.zeros(3, n + 1, dtype=torch.int64, device=first)
    device_totals = []
    for idx, (total, _, dev_norms, dev_counts) in zip(groups, results):
        index = torch.tensor(idx, device=first)
        norms[index] = dev_norms.to(first, dtype)
        counts[:, index] = dev_counts[:, :-1].to(first)
        counts[:, -1] += dev_counts[:, -1].to(first)
        device_totals.append(total.to(first, torch.float64))
    # The norm of the per-device norms (in float64, which cannot overflow here) is the total norm.
    total = torch.linalg.vector_norm(torch.stack(device_totals), norm_type).to(dtype)
    coef = torch.clamp(torch.reciprocal(total + CLIP_EPS) * max_norm, max=1.0)
    if on_nonfinite == "skip":
        coef = torch.where(counts[NONFINITE_ROW, -1] > 0, torch.ones_like(coef), coef)
    return GradStats(total, coef, norms, counts, norm_type)


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
    p = check_norm_type(norm_type)
    limit = math.inf if max_norm is None else check_max_norm(max_norm)
    if not tensors and process_group is None:
        zero = torch.zeros(())
        return GradStats(
            zero,
            None if max_norm is None else torch.ones(()),
            torch.zeros(0) if per_tensor else None,
            torch.zeros(3, 1, dtype=torch.int64),
            p,
        )
    st = compute(tensors, p, limit, "propagate", process_group, per_tensor)
    return GradStats(
        st.total_norm,
        None if max_norm is None else st.clip_coef,
        st.norms if per_tensor else None,
        st.counts,
        p,
    )


def count_nonfinite(tensors: TensorOrTensors) -> Tensor:
    """NaN + Inf counts of inputs, activations or losses, without a sync.

    A single tensor gives a 0-dim int64 count; a list gives an int64 tensor with one count per
    tensor (on the first tensor's device).
    """
    items = as_tensor_list(tensors)
    if not items:
        return torch.zeros(0, dtype=torch.int64)
    counts = compute(items, math.inf, math.inf, "zero").counts[NONFINITE_ROW]
    return counts[0] if isinstance(tensors, Tensor) else counts[:-1]
