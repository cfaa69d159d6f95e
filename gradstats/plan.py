"""L3: GradPlan, a cached plan for a parameter set that does not change between steps.

    plan = gradstats.GradPlan(model.parameters())
    ...
    loss.backward()
    norm = plan.clip_grad_norm_(max_norm=1.0)   # the same keywords as gradstats.clip_grad_norm_

The gradients are validated and planned once (on CUDA: the launches' tensor tables packed once);
what a plan keeps is each gradient's layout (present or None, dtype, device, sizes, strides), never
where it is. At every call each parameter's gradient is read from the parameter, compared with its
planned layout and checked to fit its storage, and the kernels are pointed at it. So gradients that
are new tensors with the same layouts (zero_grad(set_to_none=True), torch's default) keep the plan,
and no change torch allows (a storage resized in place, set_, as_strided_, .data =, swap_tensors,
a new dtype, shape or device, None) can make a planned call read or write memory that is not the
gradient's: any change of layout re-plans. That check is native (a few compares per parameter), so
a step costs a constant number of Python calls and one native call, not a list of N tensors
through the dispatcher. The results are bitwise those of the functional API. DTensor or sparse
gradients, a process_group, gradients on several devices and torch.compile take the functional
path (the same results, without the cache).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from gradstats import ops
from gradstats._core import (
    GradStats,
    TensorOrTensors,
    apply_clip,
    as_tensor_list,
    clip_arguments,
    kernel_policy,
    raise_if_nonfinite,
    stats_arguments,
)
from gradstats.clip import clip_grad_norm_
from gradstats.distributed import (
    MeshLayout,
    attached,
    check_combinable,
    combine,
    local_part,
    mesh_layout,
    reduced_statistics,
    statistics,
)
from gradstats.stats import grad_stats

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup


class GradPlan:
    """The gradients of a fixed list of parameters, planned once for every later step.

    clip_grad_norm_ and grad_stats take the keywords of gradstats.clip_grad_norm_ and
    gradstats.grad_stats (less the parameters) and return the same results.
    """

    def __init__(self, parameters: TensorOrTensors) -> None:
        self._params = as_tensor_list(parameters)
        for i, p in enumerate(self._params):
            if not isinstance(p, Tensor):
                raise TypeError(f"GradPlan: item {i} is a {type(p).__name__}, expected a tensor")
        self._native = ops.grad_plan(self._params)
        # DTensor gradients: their layout over the meshes, for the build it was taken from; and a
        # build whose gradients take the functional path (Partial DTensors, summed first).
        self._layout: tuple[int, MeshLayout | None] = (-1, None)
        self._functional_build = -1

    def __repr__(self) -> str:
        return f"GradPlan({len(self._params)} parameters, built {self.builds} times)"

    @property
    def params(self) -> list[Tensor]:
        """The parameters, as given."""
        return self._params

    @property
    def params_with_grads(self) -> list[Tensor]:
        """The parameters that have a gradient now, in order."""
        if torch.compiler.is_compiling():
            return [p for p in self._params if p.grad is not None]
        return self._native.params_with_grads()

    @property
    def builds(self) -> int:
        """How many times the gradients were planned: once, then again after each change of a
        gradient's layout."""
        return self._native.builds()

    def same_params(self, groups: list[list[Tensor]]) -> bool:
        """Whether these lists (an optimizer's param_groups' "params", in order) hold exactly the
        plan's parameters, the very objects in the same order. Native: no loop in Python."""
        if torch.compiler.is_compiling():
            given = [p for params in groups for p in params]
            return len(given) == len(self._params) and all(
                a is b for a, b in zip(given, self._params)
            )
        return self._native.same_params(groups)

    def norm_dtype(self) -> torch.dtype:
        """The dtype of the gradients' norms (ops.norm_dtype)."""
        if not torch.compiler.is_compiling():
            wide = self._native.wide_norms()
            if wide is not None:
                return torch.float64 if wide else torch.float32
        return ops.norm_dtype(self.grads())

    def grads(self) -> list[Tensor]:
        """The gradients, in the order of params_with_grads."""
        return [p.grad for p in self.params_with_grads]

    def _planned(
        self, norm_type: float, max_norm: float, policy: str, wide: bool, clip: bool
    ) -> GradStats | None:
        """The statistics from the plan (policy: a kernel policy), with clip the gradients clipped
        by their coefficient (NaN/Inf zeroed under "zero"); None when the plan does not serve them.
        DTensor gradients: the plan's local statistics combined over their meshes."""
        if torch.compiler.is_compiling():
            return None
        if attached():  # the statistics a gradient reduction took, when they are these gradients'
            st = reduced_statistics(self.grads(), norm_type, max_norm, policy, wide)
            if st is not None:
                if clip:
                    self.apply_clip(st.clip_coef, st.nonfinite if policy == "zero" else None)
                return st
        if self._native.builds() == self._functional_build:
            return None
        out = ops.plan_stats(self._native, norm_type, max_norm, policy, wide, clip)
        if out is None:
            return None
        *fields, local_double = out
        if local_double is None:
            return GradStats(*fields, norm_type)
        layout = self._mesh_layout()
        if layout is None or layout.partial:  # Partial DTensors are summed first: functional
            self._functional_build = self._native.builds()
            return None
        check_combinable(norm_type, None, layout)
        dtype = torch.float64 if wide or local_double else torch.float32
        local = local_part(GradStats(*fields, norm_type))
        st = combine(local, layout, norm_type, max_norm, policy, None, True, dtype)
        if clip:
            self.apply_clip(st.clip_coef, st.nonfinite if policy == "zero" else None)
        return st

    def _mesh_layout(self) -> MeshLayout | None:
        """How the gradients of the current build lie over the meshes (taken once a build)."""
        builds = self._native.builds()
        if self._layout[0] != builds:
            self._layout = (builds, mesh_layout(self.grads()))
        return self._layout[1]

    def statistics(
        self,
        norm_type: float,
        max_norm: float,
        on_nonfinite: str,
        process_group: ProcessGroup | None = None,
        per_tensor: bool = True,
        wide: bool = False,
    ) -> GradStats:
        """distributed.statistics of the gradients (arguments checked; on_nonfinite a kernel
        policy), from the plan when it serves them."""
        if process_group is None:
            st = self._planned(norm_type, max_norm, on_nonfinite, wide, False)
            if st is not None:
                return st
        grads = self.grads()
        return statistics(grads, norm_type, max_norm, on_nonfinite, process_group, per_tensor, wide)

    def apply_clip(self, coef: Tensor, zero_counts: Tensor | None = None) -> None:
        """_core.apply_clip of the gradients, from the plan when it serves them."""
        if not torch.compiler.is_compiling() and self._native.scale(coef, zero_counts):
            return
        apply_clip(self.grads(), coef, zero_counts)

    def clip_grad_norm_(
        self,
        max_norm: float,
        norm_type: float | str = 2.0,
        error_if_nonfinite: bool = False,
        foreach: bool | None = None,
        *,
        on_nonfinite: str = "propagate",
        process_group: ProcessGroup | None = None,
        return_stats: bool = False,
    ) -> Tensor | GradStats:
        """gradstats.clip_grad_norm_ of the parameters: the statistics and the clip in one native
        call (two with "error", whose raise comes between them)."""
        policy, p, limit = clip_arguments(max_norm, norm_type, error_if_nonfinite, on_nonfinite)
        if process_group is None:
            # "error" raises between the statistics and the clip; the others clip in the same call.
            clip_now = policy != "error"
            st = self._planned(p, limit, kernel_policy(policy), False, clip_now)
            if st is not None:
                if not clip_now:
                    raise_if_nonfinite(st, self.grads(), p, norm_only=error_if_nonfinite)
                    self.apply_clip(st.clip_coef)
                return st if return_stats else st.total_norm
        return clip_grad_norm_(
            self._params,
            max_norm,
            norm_type,
            error_if_nonfinite,
            foreach,
            on_nonfinite=on_nonfinite,
            process_group=process_group,
            return_stats=return_stats,
        )

    def grad_stats(
        self,
        norm_type: float | str = 2.0,
        max_norm: float | None = None,
        per_tensor: bool = True,
        *,
        process_group: ProcessGroup | None = None,
    ) -> GradStats:
        """gradstats.grad_stats of the parameters' gradients."""
        p, limit = stats_arguments(norm_type, max_norm)
        if process_group is None:
            st = self._planned(p, limit, "propagate", False, False)
            if st is not None:
                return st.trimmed(max_norm is not None, per_tensor)
        return grad_stats(
            self._params, norm_type, max_norm, per_tensor, process_group=process_group
        )
