"""One statistics pass per optimizer step, whichever torch clipping function a framework calls.

A framework clips through torch.nn.utils, but which functions it calls is its own business, and it
changes between releases: accelerate 1.15 calls clip_grad_norm_; accelerate 1.16 calls
get_total_norm per device mesh, stacks the norms, then clip_grads_with_norm_; a Trainer may call
them more than once a step (max_grad_norm=0 still computes the norm to log it). StepStatistics
does not recognise any of these call paths. It recognises what is read: while it is installed
(gradstats.patch_torch), every call of torch's clip_grad_norm_, get_total_norm and
clip_grads_with_norm_ whose tensors are all the model's current gradients is answered from the
statistics of all the model's gradients, taken in one pass (GradPlan) the first time they are read
in a step:

- get_total_norm of all of them is that pass's total norm; of a subset (one device mesh) the norm
  of the subset's per-tensor norms (the norm of the union, computed from its parts: no second
  read of the gradients);
- clipping applies on_nonfinite to the step as a whole: under "skip" and "error" a non-finite step
  scales nothing, under "zero" its NaN/Inf elements were zeroed by the pass itself (and its norms
  are those of the finite values), so the framework's norm stays finite and its clip goes on.

Any other call (other tensors, another norm_type, gradients changed since the pass) is plain
gradstats, exactly as gradstats.patch_torch() would answer it. When no such call read the
gradients by the time the optimizer steps (the framework computed the norm some other way), the
step's statistics are taken then, in one pass, so that skipping and counting never depend on the
framework's internals.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

import gradstats

# The p of the norm taken when no torch clipping call read the gradients (its p is unknown then):
# torch's default. The NaN/Inf counts and the skip decision do not depend on it.
DEFAULT_NORM_TYPE = 2.0
# The version a gradient is marked with once this step's clip has scaled it: no tensor has it, so
# later calls on that gradient read it afresh. (gradstats' in-place scale does not bump the
# version counter, as it may write nothing at all.)
_CLIPPED = -1


@dataclass
class _Pass:
    """The statistics of one step's gradients, and the gradients they are the statistics of."""

    stats: gradstats.GradStats
    params: list[Tensor]
    grads: list[Tensor]
    versions: list[int]  # of the gradients when read (an in-place change bumps them)
    position: dict[int, int] = field(default_factory=dict)  # id(gradient) -> index
    clipped: bool = False  # a clip of this step has scaled some of the gradients since

    def __post_init__(self) -> None:
        self.position = {id(g): i for i, g in enumerate(self.grads)}

    def positions(self, tensors: Sequence[Tensor]) -> list[int] | None:
        """Where each tensor sits among the step's gradients; None unless every one is a gradient
        of the step, unchanged since the pass."""
        out = []
        for t in tensors:
            i = self.position.get(id(t))
            if i is None or self.grads[i] is not t or t._version != self.versions[i]:
                return None
            out.append(i)
        return out


class StepStatistics:
    """The statistics of a model's gradients, taken once per optimizer step (see the module
    docstring), with on_nonfinite ("skip", "zero", "error", "propagate") applied to the step.

    install() puts its clip_grad_norm_, get_total_norm and clip_grads_with_norm_ in torch;
    take() returns the step's statistics and starts the next step.
    """

    def __init__(self, params: Sequence[Tensor], on_nonfinite: str) -> None:
        self._plan = gradstats.GradPlan(list(params))
        self.on_nonfinite = on_nonfinite
        self._pass: _Pass | None = None
        self._patch: gradstats.TorchPatch | None = None

    def install(self) -> None:
        """Puts this object's clip_grad_norm_, get_total_norm and clip_grads_with_norm_ in torch
        (gradstats.patch_torch) until uninstall()."""
        self.uninstall()
        self._patch = gradstats.patch_torch(
            clip_grad_norm_=self.clip_grad_norm_,
            get_total_norm=self.get_total_norm,
            clip_grads_with_norm_=self.clip_grads_with_norm_,
        )

    def uninstall(self) -> None:
        """Puts back the functions that were in torch before install()."""
        if self._patch is not None:
            self._patch.restore()
            self._patch = None

    def discard(self) -> None:
        """Forgets any statistics taken so far (a new step, or gradients still accumulating)."""
        self._pass = None

    def take(self) -> tuple[gradstats.GradStats, list[Tensor], bool]:
        """The step's statistics, the parameters they cover (those with a gradient, in order) and
        whether a torch clipping call read them; the next step starts afresh. When no call read
        the gradients this step, they are read now (one pass)."""
        current, self._pass = self._pass, None
        if current is not None and self._same_gradients(current):
            return current.stats, current.params, True
        fresh = self._read(self._plan.params_with_grads, DEFAULT_NORM_TYPE)
        return fresh.stats, fresh.params, False

    # --------------------------------------------------------------- torch's functions, replaced

    def get_total_norm(
        self,
        tensors: Tensor | Sequence[Tensor],
        norm_type: float | str = 2.0,
        error_if_nonfinite: bool = False,
        foreach: bool | None = None,
        **kwargs: Any,
    ) -> Tensor:
        items = [tensors] if isinstance(tensors, Tensor) else list(tensors)
        found = None if kwargs else self._find(items, norm_type)
        if found is None:
            return gradstats.get_total_norm(items, norm_type, error_if_nonfinite, foreach, **kwargs)
        norm = self._norm(*found)
        if error_if_nonfinite and not bool(torch.isfinite(norm)):
            # torch's rule and message; the opt-in sync, as in gradstats.get_total_norm.
            gradstats.get_total_norm(items, norm_type, error_if_nonfinite=True)
        return norm

    def clip_grad_norm_(
        self,
        parameters: Tensor | Sequence[Tensor],
        max_norm: float,
        norm_type: float | str = 2.0,
        error_if_nonfinite: bool = False,
        foreach: bool | None = None,
        **kwargs: Any,
    ) -> Tensor:
        params = [parameters] if isinstance(parameters, Tensor) else list(parameters)
        grads = [p.grad for p in params if p.grad is not None]
        plain = error_if_nonfinite or kwargs
        found = None if plain else self._find(grads, norm_type)
        if found is None:
            return gradstats.clip_grad_norm_(
                params, max_norm, norm_type, error_if_nonfinite, foreach, **kwargs
            )
        norm = self._norm(*found)
        self._clip(found[0], found[1], max_norm, norm)
        return norm

    def clip_grads_with_norm_(
        self,
        parameters: Tensor | Sequence[Tensor],
        max_norm: float,
        total_norm: Tensor,
        foreach: bool | None = None,
    ) -> None:
        params = [parameters] if isinstance(parameters, Tensor) else list(parameters)
        grads = [p.grad for p in params if p.grad is not None]
        current = self._pass
        positions = None if current is None else current.positions(grads)
        if current is None or positions is None:
            gradstats.clip_grads_with_norm_(params, max_norm, total_norm, foreach)
            return
        self._clip(current, positions, max_norm, total_norm)

    # ------------------------------------------------------------------------------- the pass

    def _find(
        self, tensors: list[Tensor], norm_type: float | str
    ) -> tuple[_Pass, list[int]] | None:
        """The step's pass and the tensors' positions in it, taking the pass now if these are the
        model's gradients and none was taken (or the one taken is stale); None for other
        tensors or another norm_type."""
        try:
            p = float(norm_type)
        except (TypeError, ValueError):
            return None  # gradstats' own function raises its message
        if not tensors:
            return None
        current = self._pass
        if current is not None:
            positions = current.positions(tensors)
            if positions is not None:
                return (current, positions) if current.stats.norm_type == p else None
            if current.clipped:  # changed by this step's own clip: these are plain calls now
                return None
        params = self._plan.params_with_grads
        position = {id(param.grad): i for i, param in enumerate(params)}
        if any(id(t) not in position for t in tensors):
            return None
        self._pass = self._read(params, p)
        positions = self._pass.positions(tensors)
        return None if positions is None else (self._pass, positions)

    def _read(self, params: list[Tensor], norm_type: float) -> _Pass:
        """One pass over the gradients of params: statistics (per-tensor norms and counts) under
        on_nonfinite, which already raises ("error") or zeroes NaN/Inf elements ("zero")."""
        stats = self._plan.clip_grad_norm_(
            math.inf, norm_type, on_nonfinite=self.on_nonfinite, return_stats=True
        )
        grads = [p.grad for p in params]
        return _Pass(stats, params, grads, [g._version for g in grads])

    def _same_gradients(self, current: _Pass) -> bool:
        params = self._plan.params_with_grads
        return len(params) == len(current.params) and all(
            p is q and p.grad is g for p, q, g in zip(params, current.params, current.grads)
        )

    @staticmethod
    def _norm(current: _Pass, positions: list[int]) -> Tensor:
        """The norm of these gradients: the pass's total, or for a subset the norm of its
        per-tensor norms (p = 0 counts the nonzero tensors: their sum)."""
        st = current.stats
        if len(positions) == len(current.grads):
            return st.total_norm
        # Slices of consecutive positions: an index tensor would be copied to the device, a sync.
        runs = itertools.groupby(enumerate(positions), key=lambda item: item[1] - item[0])
        slices = [[i for _, i in run] for _, run in runs]
        parts = torch.cat([st.norms[run[0] : run[-1] + 1] for run in slices])
        if st.norm_type == 0:
            return parts.sum()
        return gradstats.get_total_norm(parts, st.norm_type)

    def _clip(self, current: _Pass, positions: list[int], max_norm: float, norm: Tensor) -> None:
        """Clips these gradients of the step by max_norm / norm; a non-finite step under "skip"
        or "error" scales nothing (its norm counts as 0: no clip)."""
        if self.on_nonfinite in ("skip", "error"):
            norm = torch.where(current.stats.any_nonfinite, torch.zeros_like(norm), norm)
        gradstats.clip_grads_with_norm_(
            [current.params[i] for i in positions], max_norm, norm.to(current.stats.total_norm)
        )
        current.clipped = True
        for i in positions:
            current.versions[i] = _CLIPPED


__all__ = ["StepStatistics"]
