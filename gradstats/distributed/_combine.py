"""L2: global statistics from this rank's local ones: the layout of DTensors over their meshes,
the collectives that combine them, and the combine (see gradstats.distributed for the layouts)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import Tensor

from gradstats import ops
from gradstats._core import (
    INF_ROW,
    NAN_ROW,
    NONFINITE_ROW,
    GradStats,
    distributed_active,
    local_stats,
    local_tensors,
    narrowed_stats,
    norm_of_norms,
)

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup
    from torch.distributed.device_mesh import DeviceMesh

if dist.is_available():
    from torch.distributed.tensor import DTensor, Replicate

# The buffer carries the NaN and Inf rows of the counts (adjacent in GradStats.counts); the
# NaN + Inf row is their sum. A slice, not a list: indexing with a list would copy it to the device.
_SENT_ROWS = slice(NAN_ROW, INF_ROW + 1)
_NUM_SENT = INF_ROW + 1 - NAN_ROW


def check_process_group(process_group: ProcessGroup | None) -> None:
    """Raises when process_group is given but cannot be used by this rank."""
    if process_group is None:
        return
    if not distributed_active():
        raise RuntimeError(
            "gradstats: process_group was given but torch.distributed is not initialized; call "
            "torch.distributed.init_process_group first"
        )
    if not isinstance(process_group, dist.ProcessGroup):
        raise TypeError(
            "gradstats: process_group must be a torch.distributed.ProcessGroup (for a DeviceMesh "
            f"dimension: mesh.get_group(dim)); got {type(process_group).__name__}"
        )
    if dist.get_rank(process_group) < 0:
        raise ValueError(
            f"gradstats: rank {dist.get_rank()} is not a member of the process_group "
            f"{dist.get_process_group_ranks(process_group)}"
        )


@dataclass
class _Reduction:
    """DTensors reduced together: one all-reduce over each of `groups` in turn, which together span
    `size` ranks, this rank writing its part at `slot`."""

    groups: tuple[ProcessGroup, ...]
    slot: int
    size: int
    indices: list[int] = field(default_factory=list)
    # False where this rank holds a Replicate copy that the rank at coordinate 0 counts.
    contributes: list[bool] = field(default_factory=list)


@dataclass
class LocalPart:
    """This rank's statistics of its tensors (local shards of DTensors), float64."""

    norms: Tensor  # per tensor, in the norm dtype
    counts: Tensor  # int64 [3, n + 1], totals in the last column
    total: Tensor  # float64, NaN as 0
    finite_norms: Tensor  # float64 per tensor, NaN as 0


def statistics(
    tensors: Sequence[Tensor],
    norm_type: float,
    max_norm: float,
    on_nonfinite: str,
    process_group: ProcessGroup | None = None,
    per_tensor: bool = True,
    wide: bool = False,
) -> GradStats:
    """The statistics of the whole gradients that these tensors are this rank's share of,
    identical on every rank: global over the ranks for DTensors and with a process_group (see the
    module docstring), this process's own otherwise (_core.local_stats). on_nonfinite is a kernel
    policy (propagate, skip, zero); per_tensor=False may leave the per-tensor norms out.

    The norms come back in the dtype of the local gradients (float32 on a rank without any), or in
    float64 when wide. They are combined in float64, so that a float32 norm that overflows stays
    exact in the clip coefficient.
    """
    if process_group is None and not distributed_active():
        return local_stats(tensors, norm_type, max_norm, on_nonfinite, wide)
    check_process_group(process_group)
    items = list(tensors)
    layout = mesh_layout(items)
    if layout is None and process_group is None:
        return local_stats(items, norm_type, max_norm, on_nonfinite, wide)
    check_combinable(norm_type, process_group, layout)
    if layout is not None and layout.partial:
        items = [_summed(t) for t in items]
        layout = mesh_layout(items)
    shards = local_tensors(items)
    local = _local_stats(shards, norm_type, on_nonfinite, process_group)
    dtype = ops.norm_dtype(shards, wide)
    return combine(
        local, layout, norm_type, max_norm, on_nonfinite, process_group, per_tensor, dtype
    )


def check_combinable(
    norm_type: float, process_group: ProcessGroup | None, layout: MeshLayout | None
) -> None:
    """Raises for what cannot be combined over ranks: norm types <= 0, or a process_group that
    shares ranks with the DTensors' meshes."""
    if not norm_type > 0:
        raise ValueError(
            f"gradstats: norm_type {norm_type} (0, negative or -inf) is not supported for "
            "DTensor gradients or with a process_group: their norms are combined across ranks as "
            "p-norms with p > 0"
        )
    if process_group is not None and layout is not None:
        _check_disjoint(process_group, layout.meshes)


def local_part(st: GradStats) -> LocalPart:
    """This rank's statistics (wide: float64 norms) as combine() takes them."""
    return LocalPart(st.norms, st.counts, _without_nan(st.total_norm), _without_nan(st.norms))


def combine(
    local: LocalPart,
    layout: MeshLayout | None,
    norm_type: float,
    max_norm: float,
    on_nonfinite: str,
    process_group: ProcessGroup | None,
    per_tensor: bool,
    dtype: torch.dtype,
) -> GradStats:
    """The global statistics from this rank's local ones: each reduction of the layout (one
    all-reduce a set of meshes' groups), the replicated tensors counted once, the totals over
    process_group; narrowed to dtype, the coefficient from the exact float64 total."""
    reductions = [] if layout is None else layout.reductions
    replicated = list(range(local.norms.numel())) if layout is None else layout.replicated
    n = local.norms.numel()

    # This rank's share as disjoint parts, (p-norm in float64, NaN and Inf counts) each; the
    # per-tensor statistics of reduced DTensors replaced by their global ones.
    parts: list[tuple[Tensor, Tensor]] = []
    norms, counts = local.norms.clone(), local.counts.clone()
    for red in reductions:
        idx = None if red.indices == list(range(n)) else _to_device(red.indices, torch.int64, norms)
        total, red_counts, red_norms = _reduce(red, local, idx, norm_type, per_tensor)
        parts.append((total, red_counts.sum(dim=1)))
        if idx is None:
            norms.copy_(red_norms)
            counts[_SENT_ROWS, :n] = red_counts
        else:
            norms.index_copy_(0, idx, red_norms.to(norms.dtype))
            counts[_SENT_ROWS, idx] = red_counts
    if replicated and not reductions:
        parts.append((local.total, local.counts[_SENT_ROWS, -1]))
    elif replicated:
        idx = _to_device(replicated, torch.int64, norms)
        part = norm_of_norms(local.finite_norms.index_select(0, idx), norm_type)
        parts.append((part, local.counts[_SENT_ROWS, idx].sum(dim=1)))

    if parts:
        total = norm_of_norms(torch.stack([norm for norm, _ in parts]), norm_type)
        total_counts = torch.stack([count for _, count in parts]).sum(dim=0)
    else:
        total, total_counts = local.total, local.counts[_SENT_ROWS, -1]
    if process_group is not None:
        total, total_counts = _all_reduce_totals(process_group, total, total_counts, norm_type)
    counts[_SENT_ROWS, -1] = total_counts
    counts[NONFINITE_ROW] = counts[NAN_ROW] + counts[INF_ROW]

    if on_nonfinite != "zero":
        total = _as_reported(total, counts[:, -1])
        norms = _as_reported(norms, counts[:, :-1])
    norms = norms if per_tensor else None
    return narrowed_stats(total, norms, counts, norm_type, dtype, max_norm, on_nonfinite == "skip")


def _local_stats(
    shards: list[Tensor], norm_type: float, on_nonfinite: str, process_group: ProcessGroup | None
) -> LocalPart:
    if shards:
        return local_part(local_stats(shards, norm_type, math.inf, on_nonfinite, wide=True))
    device = _group_device(process_group)
    norms = torch.zeros(0, dtype=torch.float64, device=device)
    counts = torch.zeros(3, 1, dtype=torch.int64, device=device)
    total = torch.zeros((), dtype=torch.float64, device=device)
    return LocalPart(norms, counts, total, norms)


def _check_disjoint(process_group: ProcessGroup, meshes: list[DeviceMesh]) -> None:
    """A process_group that shares ranks with a DTensor's mesh would count that DTensor twice."""
    group_ranks = set(dist.get_process_group_ranks(process_group))
    for mesh in meshes:
        shared = group_ranks & set(mesh.mesh.flatten().tolist())
        if len(shared) > 1:
            raise ValueError(
                f"gradstats: process_group (ranks {sorted(group_ranks)}) shares ranks "
                f"{sorted(shared)} with the device mesh of DTensor gradients ({mesh}). DTensors "
                "are reduced over their own mesh already, so this would count them twice. Pass a "
                "process_group only to combine ranks that hold different gradients (e.g. "
                "pipeline stages); drop it for FSDP2 or tensor parallel gradients."
            )


def _summed(t: Tensor) -> Tensor:
    """A Partial DTensor summed over its Partial dimensions (its norm and counts need the values);
    any other tensor as it is."""
    if not isinstance(t, DTensor) or not any(p.is_partial() for p in t.placements):
        return t
    placements = [Replicate() if p.is_partial() else p for p in t.placements]
    return t.redistribute(t.device_mesh, placements)


@dataclass
class MeshLayout:
    """How a list of tensors is spread over the ranks, from its DTensors' meshes and placements:
    what combine() needs besides the local statistics."""

    reductions: list[_Reduction]
    replicated: list[int]  # positions whose local statistics are already global
    meshes: list[DeviceMesh]
    partial: bool  # a DTensor has Partial placements: summed (redistributed) before anything


def mesh_layout(items: Sequence[Tensor]) -> MeshLayout | None:
    """The layout of the items (None when none is a DTensor): one pass over their specs, each
    distinct placements tuple looked at once (FSDP2's thousands of gradients share a handful)."""
    by_mesh: dict[int, tuple[DeviceMesh, list[tuple[int, tuple]]]] = {}
    replicated: list[int] = []
    for i, t in enumerate(items):
        if isinstance(t, DTensor):
            spec = t._spec
            entry = by_mesh.setdefault(id(spec.mesh), (spec.mesh, []))
            entry[1].append((i, spec.placements))
        else:
            replicated.append(i)
    if not by_mesh:
        return None
    reductions: dict[tuple[str, ...], _Reduction] = {}
    partial = False
    for mesh, members in by_mesh.values():
        coordinate = mesh.get_coordinate()
        if coordinate is None:
            raise ValueError(f"gradstats: rank {dist.get_rank()} is not in the DTensors' {mesh}")
        distinct = {id(placements): placements for _, placements in members}
        partial = partial or any(p.is_partial() for pl in distinct.values() for p in pl)
        sharded = sorted({d for pl in distinct.values() for d, p in enumerate(pl) if p.is_shard()})
        if not sharded:
            replicated.extend(i for i, _ in members)
            continue
        groups, slot, size, covered = _mesh_groups(mesh, sharded)
        key = tuple(g.group_name for g in groups)
        red = reductions.setdefault(key, _Reduction(groups, slot, size))
        # Only the rank at coordinate 0 of a Replicate dimension counts its copy.
        counts_copy = {
            k: all(coordinate[d] == 0 for d in covered if pl[d].is_replicate())
            for k, pl in distinct.items()
        }
        for i, placements in members:
            red.indices.append(i)
            red.contributes.append(counts_copy[id(placements)])
    replicated.sort()
    meshes = [mesh for mesh, _ in by_mesh.values()]
    return MeshLayout(list(reductions.values()), replicated, meshes, partial)


def _mesh_groups(
    mesh: DeviceMesh, dims: list[int]
) -> tuple[tuple[ProcessGroup, ...], int, int, tuple[int, ...]]:
    """Process groups spanning the mesh dimensions `dims`, this rank's slot among the ranks they
    span, their number, and the mesh dimensions they cover.

    One dimension: its group. Several on a mesh over every rank: the world group (one collective,
    covering every dimension). Otherwise each dimension's group in turn.
    """
    if len(dims) > 1 and mesh.size() == dist.get_world_size():
        world = dist.group.WORLD
        return (world,), dist.get_rank(), dist.get_world_size(), tuple(range(mesh.ndim))
    slot, size = 0, 1
    for d in dims:
        slot = slot * mesh.size(d) + mesh.get_local_rank(d)
        size *= mesh.size(d)
    return tuple(mesh.get_group(d) for d in dims), slot, size, tuple(dims)


def _reduce(
    red: _Reduction, local: LocalPart, idx: Tensor | None, norm_type: float, per_tensor: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """The global statistics of red's DTensors: total (float64), NaN and Inf counts [2, k] and
    per-tensor norms [k] (float64).

    One SUM all-reduce of [slots | counts | per-tensor norm^p], and a MAX one for per-tensor inf
    norms. This rank's part is the p-norm of the tensors it counts, written in its own slot.
    """
    n = local.norms.numel()
    norms = local.finite_norms if idx is None else local.finite_norms.index_select(0, idx)
    counts = local.counts[_SENT_ROWS, :n] if idx is None else local.counts[_SENT_ROWS, idx]
    if not all(red.contributes):
        mask = _to_device(red.contributes, torch.bool, norms)
        norms = torch.where(mask, norms, 0.0)
        counts = torch.where(mask, counts, 0)
    # The kernel's own total is exact; recombining per-tensor norms rounds each to their dtype.
    mine = local.total if idx is None and all(red.contributes) else norm_of_norms(norms, norm_type)

    k = norms.numel()
    sums_per_tensor = per_tensor and not math.isinf(norm_type)
    count_end = red.size + _NUM_SENT * k
    buffer = torch.zeros(
        count_end + (k if sums_per_tensor else 0), dtype=torch.float64, device=norms.device
    )
    buffer[red.slot] = mine
    buffer[red.size : count_end] = counts.reshape(-1)
    if sums_per_tensor:
        buffer[count_end:] = norms.pow(norm_type)
    for group in red.groups:
        dist.all_reduce(buffer, op=dist.ReduceOp.SUM, group=group)

    total = norm_of_norms(buffer[: red.size], norm_type)
    reduced_counts = buffer[red.size : count_end].reshape(_NUM_SENT, k).to(torch.int64)
    if sums_per_tensor:
        return total, reduced_counts, buffer[count_end:].pow(1.0 / norm_type)
    if per_tensor:
        maxima = norms.clone()
        for group in red.groups:
            dist.all_reduce(maxima, op=dist.ReduceOp.MAX, group=group)
        return total, reduced_counts, maxima
    return total, reduced_counts, norms


def _all_reduce_totals(
    process_group: ProcessGroup, total: Tensor, counts: Tensor, norm_type: float
) -> tuple[Tensor, Tensor]:
    """The totals of every rank of process_group, from this rank's: one SUM all-reduce."""
    size = dist.get_world_size(process_group)
    buffer = torch.zeros(size + _NUM_SENT, dtype=torch.float64, device=total.device)
    buffer[dist.get_rank(process_group)] = total
    buffer[size:] = counts
    dist.all_reduce(buffer, op=dist.ReduceOp.SUM, group=process_group)
    return norm_of_norms(buffer[:size], norm_type), buffer[size:].to(torch.int64)


def _as_reported(norms: Tensor, counts: Tensor) -> Tensor:
    """NaN where counts (rows NaN, Inf, ...) hold a NaN, else Inf where they hold an Inf, as the
    kernels report norms unless on_nonfinite="zero"."""
    nan, inf = counts[NAN_ROW] > 0, counts[INF_ROW] > 0
    return torch.where(nan, math.nan, torch.where(inf, math.inf, norms))


def _without_nan(norms: Tensor) -> Tensor:
    """float64 norms with NaN as 0: the counts carry the NaN, and a NaN would poison the sums.
    Inf stays: it is either an Inf element (the counts say so) or a norm beyond the dtype."""
    wide = norms.double()
    return torch.where(torch.isnan(wide), 0.0, wide)


def _to_device(values: list, dtype: torch.dtype, like: Tensor) -> Tensor:
    """A small host list as a tensor on like's device, copied without waiting for the device."""
    host = torch.tensor(values, dtype=dtype)
    if like.device.type == "cpu":
        return host
    return host.pin_memory().to(like.device, non_blocking=True)


def _group_device(process_group: ProcessGroup | None) -> torch.device:
    """Where a rank without gradients puts its buffer: the device of the group's backend."""
    if process_group is not None and dist.get_backend(process_group) == dist.Backend.NCCL:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
