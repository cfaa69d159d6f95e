"""L2: gradient statistics taken inside the gradient reduction, while backward goes on.

    handle = gradstats.distributed.attach(model)   # a DDP model, or an FSDP2 (fully_shard) one
    ...
    loss.backward()                                # each bucket's statistics taken as it arrives
    gradstats.clip_grad_norm_(model.parameters(), 1.0)   # a combine and the scale, no pass
    handle.detach()

Where the framework already reduces the gradients, their statistics can be taken from each reduced
piece as it arrives, so that the optimizer step only combines the pieces' partial statistics and
scales:

- DDP: a communication hook wraps the reduction (torch's default all-reduce, or the fp16/bf16
  compression hooks passed as `ddp_hook=`): when a bucket's reduction completes, one fused pass
  over the reduced bucket (the values DDP then writes into the gradients) gives its per-tensor
  norms and NaN/Inf counts.
- FSDP2: each sharded gradient is final once FSDP2 has reduce-scattered, divided, cast and (under
  gradient accumulation) accumulated it, and FSDP2 then runs the parameter's post-accumulate-grad
  hooks; the hooks collect an FSDP module's parameters, and one fused pass per module reads their
  local shards (no padding: the shards as the gradients hold them). set_all_reduce_hook would see
  the reduce-scatter output before the division, the cast and the accumulation, padding included.

Each backward's statistics are sealed when backward ends, with the identity and version of every
gradient they cover. gradstats.clip_grad_norm_, get_total_norm, grad_stats and ClipGradOptimizer
use them when they cover exactly the gradients asked for, unchanged since (the same tensors, not
modified in place: a GradScaler's unscale_, or a framework's own clip, modifies them and the call
takes a pass of its own), with the norm_type they were taken for. Under gradient accumulation only
the final backward's reduction counts: DDP's no_sync and FSDP2's set_requires_gradient_sync(False)
reduce nothing in the others (no statistics), and FSDP2's accumulating reductions are read after
the accumulation. Only p-norms with p > 0 combine over ranks: other norm types are refused.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from gradstats import ops
from gradstats._core import GradStats, norm_of_norms
from gradstats.distributed._combine import (
    LocalPart,
    MeshLayout,
    check_combinable,
    combine,
    mesh_layout,
)

# The kernel policy of the hooks' passes: per-tensor norms of the finite values, with the NaN/Inf
# counts beside them, from which every on_nonfinite policy's result follows (distributed.combine).
_HOOK_POLICY = "zero"
# Handles whose statistics the clipping functions may use (weakly held: a dropped handle is gone).
_ATTACHED: weakref.WeakSet[ReductionStats] = weakref.WeakSet()


@dataclass
class _Piece:
    """The statistics of one reduced piece (a DDP bucket, an FSDP2 module's shards): float64
    per-tensor norms of the finite values and int64 counts, of `params` in order."""

    params: list[Tensor]
    norms: Tensor
    counts: Tensor  # [3, n + 1]
    dtype: torch.dtype  # ops.norm_dtype of the tensors read


@dataclass
class _Sealed:
    """The statistics of one backward, and the gradients they describe."""

    position: dict[int, int]  # id(gradient) -> index in refs
    refs: list[weakref.ref[Tensor]]  # the gradients, not kept alive (zero_grad frees them)
    versions: list[int]
    norms: Tensor  # float64 [n], of the finite values
    counts: Tensor  # int64 [3, n], per tensor
    dtype: torch.dtype  # of the norms these gradients give


class ReductionStats:
    """What attach() returns: the statistics its hooks took during the last backward.

    detach() removes the hooks (a DDP communication hook cannot be unregistered: it then only
    runs the reduction it wraps).
    """

    def __init__(self, norm_type: float) -> None:
        self.norm_type = norm_type
        self._pieces: list[_Piece] = []
        self._sealed: _Sealed | None = None
        self._seal_queued = False
        self._active = True
        self._removers: list[Callable[[], None]] = []
        self._layout: tuple[list[Any], MeshLayout | None] = ([], None)
        _ATTACHED.add(self)

    @property
    def active(self) -> bool:
        """Whether the hooks still take statistics (False after detach())."""
        return self._active

    def detach(self) -> None:
        self._active = False
        for remove in self._removers:
            remove()
        self._removers.clear()
        self._pieces.clear()
        self._sealed = None
        _ATTACHED.discard(self)

    # ------------------------------------------------------------------------ during backward

    def _begin(self) -> None:
        """Called by the hooks on the autograd thread: the statistics of this backward are sealed
        when it ends, after the frameworks' own end-of-backward work (DDP waits for its buckets'
        reductions and writes the gradients then)."""
        if self._active and not self._seal_queued:
            _queue_last(self._seal)
            self._seal_queued = True

    def _record(self, params: list[Tensor], tensors: list[Tensor]) -> None:
        """One fused pass over a reduced piece: tensors are params' gradients as reduced."""
        if not self._active or not tensors:
            return
        _, _, norms, counts = ops.stats(tensors, self.norm_type, math.inf, _HOOK_POLICY, wide=True)
        self._pieces.append(_Piece(params, norms, counts, ops.norm_dtype(tensors)))

    def _seal(self) -> None:
        """The backward's pieces, tied to the gradients they now are (a parameter left without a
        gradient dropped)."""
        self._seal_queued = False
        pieces, self._pieces = self._pieces, []
        grads: list[Tensor] = []
        norms: list[Tensor] = []
        counts: list[Tensor] = []
        for piece in pieces:
            kept = [i for i, p in enumerate(piece.params) if p.grad is not None]
            grads += [piece.params[i].grad for i in kept]
            n = len(piece.params)
            if len(kept) == n:
                norms.append(piece.norms[:n])
                counts.append(piece.counts[:, :n])
            elif kept:
                select = torch.tensor(kept, device=piece.norms.device)
                norms.append(piece.norms.index_select(0, select))
                counts.append(piece.counts.index_select(1, select))
        if not grads:
            self._sealed = None
            return
        wide = any(piece.dtype == torch.float64 for piece in pieces)
        self._sealed = _Sealed(
            {id(g): k for k, g in enumerate(grads)},
            [weakref.ref(g) for g in grads],
            [g._version for g in grads],
            torch.cat(norms),
            torch.cat(counts, dim=1),
            torch.float64 if wide else torch.float32,
        )

    # ----------------------------------------------------------------------- at the step

    def statistics(
        self,
        grads: Sequence[Tensor],
        norm_type: float,
        max_norm: float,
        on_nonfinite: str,
        wide: bool = False,
    ) -> GradStats | None:
        """The global statistics of these gradients from the last backward's pieces (combined over
        the ranks for sharded ones), with the on_nonfinite kernel policy applied (wide: float64
        norms); None unless the pieces cover exactly these gradients, unchanged, for this
        norm_type."""
        sealed = self._sealed
        if sealed is None or norm_type != self.norm_type or len(grads) != len(sealed.refs):
            return None
        norms, counts = sealed.norms, sealed.counts
        if not all(ref() is g for ref, g in zip(sealed.refs, grads)):  # another order, or others
            order = [sealed.position.get(id(g)) for g in grads]
            if any(k is None or sealed.refs[k]() is not g for k, g in zip(order, grads)):
                return None
            select = torch.tensor(order, device=norms.device)
            norms, counts = norms.index_select(0, select), counts.index_select(1, select)
            versions = [sealed.versions[k] for k in order]
        else:
            versions = sealed.versions
        if [g._version for g in grads] != versions:  # changed in place since the reduction
            return None
        layout = self._mesh_layout(grads)
        if layout is not None:
            check_combinable(norm_type, None, layout)
        full = torch.cat([counts, counts.sum(dim=1, keepdim=True)], dim=1)
        local = LocalPart(norms, full, norm_of_norms(norms, norm_type), norms)
        dtype = torch.float64 if wide else sealed.dtype
        return combine(local, layout, norm_type, max_norm, on_nonfinite, None, True, dtype)

    def _mesh_layout(self, grads: Sequence[Tensor]) -> MeshLayout | None:
        """mesh_layout of the gradients, taken again only when their specs change (FSDP2 gives
        each step's gradients their parameters' spec objects)."""
        specs = [getattr(g, "_spec", None) for g in grads]
        cached, layout = self._layout
        if len(cached) != len(specs) or any(a is not b for a, b in zip(specs, cached)):
            layout = mesh_layout(grads)
            self._layout = (specs, layout)
        return layout


def _queue_last(callback: Callable[[], None]) -> None:
    """Runs callback when the current backward ends, after every end-of-backward callback queued
    so far and those they queue: DDP queues its own (which writes the gradients) only when the last
    bucket is ready, after the hooks that called this. Queued from a callback, it comes after the
    callbacks already in the queue."""
    engine = torch.autograd.Variable._execution_engine
    engine.queue_callback(lambda: engine.queue_callback(callback))


def attached() -> bool:
    """Whether any handle may hold statistics (reduced_statistics is worth asking)."""
    return bool(_ATTACHED)


def reduced_statistics(
    grads: Sequence[Tensor],
    norm_type: float,
    max_norm: float,
    on_nonfinite: str,
    wide: bool = False,
) -> GradStats | None:
    """The statistics of these gradients from an attached handle, when one covers them (no pass
    over the gradients); None otherwise. Free when nothing is attached."""
    if not _ATTACHED or not grads or torch.compiler.is_compiling():
        return None
    for handle in list(_ATTACHED):
        st = handle.statistics(grads, norm_type, max_norm, on_nonfinite, wide)
        if st is not None:
            return st
    return None


# ----------------------------------------------------------------------------------- attach


def attach(
    model: nn.Module, norm_type: float | str = 2.0, *, ddp_hook: Callable | None = None
) -> ReductionStats:
    """Takes the gradient statistics of a DDP or FSDP2 model inside its gradient reduction (see
    the module docstring); returns the handle (detach() to stop).

    norm_type: the p the clipping will use (a p-norm, p > 0). ddp_hook: the DDP communication hook
    to wrap (torch's allreduce_hook by default; fp16_compress_hook and bf16_compress_hook compose),
    called with its default state (the process group).
    """
    p = float(norm_type)
    if not p > 0:
        raise ValueError(
            "gradstats.distributed.attach: norm_type must be a p-norm with p > 0 (norms combine "
            f"over ranks only so); got {norm_type!r}"
        )
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "gradstats.distributed.attach: torch.distributed is not initialized; call "
            "torch.distributed.init_process_group first"
        )
    if isinstance(model, nn.parallel.DistributedDataParallel):
        handle = ReductionStats(p)
        _attach_ddp(model, handle, ddp_hook)
        return handle
    if _fsdp_modules(model):
        if ddp_hook is not None:
            raise ValueError("gradstats.distributed.attach: ddp_hook is for DDP models only")
        handle = ReductionStats(p)
        _attach_fsdp2(model, handle)
        return handle
    raise TypeError(
        "gradstats.distributed.attach takes a DistributedDataParallel model or a model with FSDP2 "
        f"(fully_shard) modules; got {type(model).__name__} with neither"
    )


def _attach_ddp(
    model: nn.parallel.DistributedDataParallel, handle: ReductionStats, ddp_hook: Callable | None
) -> None:
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    inner = ddp_hook or default_hooks.allreduce_hook

    # Not annotated: DDP checks a hook's annotations against the classes themselves, and this
    # module's annotations are strings (from __future__ import annotations).
    def hook(state, bucket):
        future = inner(state, bucket)
        if not handle.active:
            return future
        handle._begin()
        params = list(bucket.parameters())

        def record(done: torch.futures.Future[Tensor]) -> Tensor:
            reduced = done.value()
            views, at = [], 0
            for p in params:
                views.append(reduced[at : at + p.numel()].view_as(p))
                at += p.numel()
            handle._record(params, views)
            return reduced

        return future.then(record)

    model.register_comm_hook(None, hook)


def _fsdp_modules(model: nn.Module) -> list[nn.Module]:
    kind = getattr(getattr(torch.distributed, "fsdp", None), "FSDPModule", None)
    return [] if kind is None else [m for m in model.modules() if isinstance(m, kind)]


def _attach_fsdp2(model: nn.Module, handle: ReductionStats) -> None:
    """A post-accumulate-grad hook on every parameter; one pass per FSDP module once all its
    parameters have their gradient (the rest when backward ends)."""
    modules = _fsdp_modules(model)
    owner: dict[int, int] = {}
    for k, m in enumerate(modules):  # outer modules first: inner ones take their parameters over
        for p in m.parameters():
            owner[id(p)] = k
    groups: list[list[Tensor]] = [[] for _ in modules]
    for p in model.parameters():
        if id(p) in owner:
            groups[owner[id(p)]].append(p)
    pending: dict[int, list[Tensor]] = {}

    def flush(k: int) -> None:
        params = [p for p in pending.pop(k, []) if p.grad is not None]
        handle._record(params, [getattr(p.grad, "_local_tensor", p.grad) for p in params])

    def flush_all() -> None:
        for k in list(pending):
            flush(k)

    def reduced(param: Tensor) -> None:
        if not handle.active:
            return
        if not handle._seal_queued:
            # The first gradient of this backward: modules some of whose parameters get no
            # gradient are read when backward ends, before the statistics are sealed.
            _queue_last(flush_all)
        handle._begin()
        k = owner[id(param)]
        waiting = pending.setdefault(k, [])
        waiting.append(param)
        if len(waiting) == len(groups[k]):
            flush(k)

    hooks = [p.register_post_accumulate_grad_hook(reduced) for p in model.parameters()]
    handle._removers.append(lambda: [h.remove() for h in hooks])


__all__ = ["ReductionStats", "attach", "attached", "reduced_statistics"]
