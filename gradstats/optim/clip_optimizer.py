"""ClipGradOptimizer: gradient clipping and non-finite handling folded into optimizer.step().

    inner = torch.optim.AdamW(model.parameters(), fused=True)
    opt = gradstats.ClipGradOptimizer(inner, max_norm=1.0)

Each step reads every gradient once (one fused statistics launch per device), clips, and then takes
the wrapped optimizer's step, or skips it when a gradient holds NaN/Inf.

Host synchronisation, path by path (a "sync" is a device-to-host read that waits for the device):

- Fused inner optimizer (any with ``_step_supports_amp_scaling``: fused Adam/AdamW/SGD/Adagrad):
  the clip coefficient goes to the kernel as ``grad_scale = 1 / coef`` and the skip decision as
  ``found_inf``; no sync. Exception: until the inner optimizer has taken its first step (and
  again after ``add_param_group``/``load_state_dict``), ``on_nonfinite="skip"`` syncs once per
  step, so that a skipped first step creates no optimizer state (torch's fused SGD would otherwise
  keep an uninitialised momentum buffer from a skipped first step).
- Other optimizers: the in-place fused scale (which does nothing on the device when nothing is
  clipped); ``on_nonfinite="skip"`` syncs once per step to decide whether to call the inner step;
  ``"zero"`` and ``"propagate"`` never sync.
- Opt-in syncs: ``on_nonfinite="error"`` and ``max_consecutive_nonfinite`` (one read per step),
  ``stats_dict()`` and ``int(skipped_steps)`` (they are for logging).
- Under ``torch.amp.GradScaler``: as above, with the scaler's found-inf flag folded in; non-fused
  inner optimizers sync once per step to skip, as ``GradScaler.step`` itself does.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import Tensor
from torch.optim import Optimizer

from gradstats._core import (
    GradStats,
    check_int,
    check_max_norm,
    check_norm_type,
    check_on_nonfinite,
    clip_coef,
    kernel_policy,
    narrowed_stats,
    nonfinite_report,
)
from gradstats.distributed import check_process_group
from gradstats.optim._checkpoint import STATE_KEY, parse_wrapper_state, wrapper_state
from gradstats.optim._step import StepMode, fused_step, inner_step, inplace_step
from gradstats.optim.adaptive import AdaptiveClip
from gradstats.plan import GradPlan

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup


class StepMonitor(Protocol):
    """What `monitor=` must provide (gradstats.GradMonitor does)."""

    def step(self, *, stats: GradStats, params: list[Tensor], skipped: Tensor) -> object: ...


class ClipGradOptimizer(Optimizer):
    """Wraps an optimizer so that step() clips the gradient norm and handles NaN/Inf gradients.

    Args:
        optimizer: the torch.optim.Optimizer that takes the steps. The wrapper shares its
            `param_groups`, `state` and `defaults`, so LR schedulers, `zero_grad` and
            `add_param_group` act on it.
        max_norm: clip the total gradient norm to this (a number), or an AdaptiveClip.
        norm_type: the p of the p-norm (any p > 0, or inf).
        on_nonfinite: what a step with NaN/Inf gradients does:
            "skip": the inner step is not taken: parameters, optimizer state (step counters
                included) and gradients are left as they were; `skipped_steps` grows by one.
            "zero": the NaN/Inf elements are set to 0, the rest clipped by the norm of the finite
                values, and the step is taken.
            "error": raise naming the parameters and their NaN/Inf counts; nothing is changed.
            "propagate": what clip_grad_norm_ + step() do in torch (NaN spreads to the weights).
            Under a GradScaler a NaN/Inf gradient is the scaler's overflow signal: the step is
            skipped (and counted) whatever this says, as GradScaler.step does.
        max_consecutive_nonfinite: raise (taking no step) when this many steps in a row had NaN/Inf
            gradients. Opt-in: one host sync per step.
        monitor: called after the statistics of every step as
            `monitor.step(stats=stats, params=params, skipped=skipped)`, with the step's
            GradStats, the parameters with gradients in the same order as the statistics'
            tensors, and whether the step is skipped (a 0-dim bool tensor on the device).
        process_group: the ranks over which the gradients are split (ZeRO-style slices,
            parameters split across ranks): the norm, the clip coefficient and the skip decision
            are global, the same on every rank. Not needed for DTensor (FSDP2, tensor parallel)
            or replicated (DDP) gradients; see gradstats.distributed.

    Attributes:
        last_stats: the GradStats of the last step (norms of the unscaled gradients; clip_coef is
            the coefficient applied), or None before the first step.
        skipped_steps: 0-dim int64 tensor on the device; `int(opt.skipped_steps)` reads it.

    See the module docstring for which paths synchronise with the host.
    """

    _step_supports_amp_scaling = True

    def __init__(
        self,
        optimizer: Optimizer,
        max_norm: float | AdaptiveClip,
        norm_type: float | str = 2.0,
        on_nonfinite: str = "skip",
        max_consecutive_nonfinite: int | None = None,
        monitor: StepMonitor | None = None,
        *,
        process_group: ProcessGroup | None = None,
    ) -> None:
        if not isinstance(optimizer, Optimizer):
            raise TypeError(
                f"ClipGradOptimizer wraps a torch.optim.Optimizer; got {type(optimizer).__name__}"
            )
        if isinstance(optimizer, ClipGradOptimizer):
            raise TypeError("ClipGradOptimizer: the optimizer is already a ClipGradOptimizer")
        if isinstance(max_norm, AdaptiveClip):
            self.adaptive: AdaptiveClip | None = max_norm
            self._max_norm = math.inf
        else:
            self.adaptive = None
            self._max_norm = check_max_norm(max_norm)
        check_int("max_consecutive_nonfinite", max_consecutive_nonfinite, 1, optional=True)
        if monitor is not None and not callable(getattr(monitor, "step", None)):
            raise TypeError(
                "monitor must have a step(stats=..., params=...) method; got "
                f"{type(monitor).__name__}"
            )
        self.optimizer = optimizer
        self.max_norm = max_norm
        self.norm_type = check_norm_type(norm_type)
        self.on_nonfinite = check_on_nonfinite(on_nonfinite)
        self.max_consecutive_nonfinite = max_consecutive_nonfinite
        self.monitor = monitor
        check_process_group(process_group)
        self.process_group = process_group
        # Everything a step changes, in one dict updated in place: torch.compile (2.11) cannot
        # trace assignments to the optimizer's attributes inside a compiled step.
        self._run: dict[str, Any] = {
            # Steps skipped so far, and steps in a row with NaN/Inf (0-dim int64, on the device).
            "skipped_steps": torch.zeros((), dtype=torch.int64),
            "consecutive": torch.zeros((), dtype=torch.int64),
            # False until the inner (fused) optimizer has taken a step: see the module docstring.
            "fused_ready": False,
            # The last step, for logging.
            "stats": None,
            "skipped": torch.zeros((), dtype=torch.bool),
            "threshold": self._max_norm,
            "params": [],
            # The GradPlan of the param_groups' parameters.
            "plan": None,
        }
        # Optimizer.__init__ is not called (it would re-add the inner optimizer's groups); these
        # are the pieces of it that the hooks and the profiler need.
        self._optimizer_step_pre_hooks = OrderedDict()
        self._optimizer_step_post_hooks = OrderedDict()
        self._optimizer_state_dict_pre_hooks = OrderedDict()
        self._optimizer_state_dict_post_hooks = OrderedDict()
        self._optimizer_load_state_dict_pre_hooks = OrderedDict()
        self._optimizer_load_state_dict_post_hooks = OrderedDict()
        self._patch_step_function()

    # The wrapped optimizer's containers, shared (the inner load_state_dict replaces them).
    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        self.optimizer.param_groups = value

    @property
    def state(self) -> Any:
        return self.optimizer.state

    @state.setter
    def state(self, value: Any) -> None:
        self.optimizer.state = value

    @property
    def defaults(self) -> dict[str, Any]:
        return self.optimizer.defaults

    @defaults.setter
    def defaults(self, value: dict[str, Any]) -> None:
        self.optimizer.defaults = value

    @property
    def last_stats(self) -> GradStats | None:
        """The GradStats of the last step (norms of the unscaled gradients; clip_coef is the
        coefficient applied), or None before the first step."""
        return self._run["stats"]

    @property
    def last_threshold(self) -> Tensor | float:
        """The clip threshold of the last step: max_norm, or AdaptiveClip's (a 0-dim tensor)."""
        return self._run["threshold"]

    @property
    def plan(self) -> GradPlan:
        """The GradPlan of the param_groups' parameters (plan.builds: how often it was planned)."""
        return self._plan()

    @property
    def skipped_steps(self) -> Tensor:
        """Steps skipped for NaN/Inf gradients so far (0-dim int64 on the device)."""
        return self._run["skipped_steps"]

    @property
    def consecutive_nonfinite(self) -> Tensor:
        """Steps in a row, up to the last one, whose gradients held NaN/Inf (0-dim int64)."""
        return self._run["consecutive"]

    def __repr__(self) -> str:
        return (
            f"ClipGradOptimizer(max_norm={self.max_norm!r}, norm_type={self.norm_type}, "
            f"on_nonfinite={self.on_nonfinite!r}, optimizer={self.optimizer!r})"
        )

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        # The GradPlan holds native state for these very parameters: made again after a copy.
        state["_run"] = {**self._run, "plan": None}
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._patch_step_function()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        self.optimizer.add_param_group(param_group)
        self._run["fused_ready"] = False

    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """Statistics of every gradient in one fused pass, clip, then the inner step (or a skip).

        With a closure, it is evaluated first and decides the step (skip, error, counters,
        monitor) before the inner optimizer changes anything; the inner optimizer then gets a
        closure that hands it that evaluation and clips the gradients of every later one (LBFGS
        evaluates several times per step). Returns what the closure returned (None without one).
        """
        if closure is None:
            with torch.no_grad():
                self._clip_and_step(None)
            return None
        with torch.enable_grad():
            loss = closure()
        unused = [loss]

        def evaluate() -> Any:
            if unused:  # the evaluation above: its gradients are in place, clipped
                return unused.pop()
            with torch.enable_grad():
                value = closure()
            with torch.no_grad():
                self._clip_evaluation()
            return value

        with torch.no_grad():
            self._clip_and_step(evaluate)
        return loss

    def _plan(self) -> GradPlan:
        """The GradPlan of every parameter of the param_groups, made again when they are not the
        plan's parameters any more (add_param_group, a group's list or one of its parameters
        replaced): compared object by object, natively, so a step costs no loop in Python."""
        run = self._run
        groups = [g["params"] for g in self.param_groups]
        plan = run["plan"]
        if plan is None or not plan.same_params(groups):
            plan = run["plan"] = GradPlan([p for params in groups for p in params])
        return plan

    def _param_names(self, params: list[Tensor]) -> list[str]:
        """Names from named_parameters() when the groups have them, else param_groups[i][j]."""
        names: dict[int, str] = {}
        for i, group in enumerate(self.param_groups):
            given = group.get("param_names")
            for j, p in enumerate(group["params"]):
                names[id(p)] = given[j] if given is not None else f"param_groups[{i}][{j}]"
        return [names[id(p)] for p in params]

    def _to_device(self, device: torch.device) -> None:
        run = self._run
        if run["skipped_steps"].device != device:
            run["skipped_steps"] = run["skipped_steps"].to(device)
            run["consecutive"] = run["consecutive"].to(device)

    def _mode(self) -> StepMode:
        # GradScaler.step sets grad_scale (the loss scale still in the gradients; None once
        # unscale_ was called) and found_inf (its overflow flag) on the optimizer it steps.
        scaler_found = getattr(self, "found_inf", None)
        return StepMode(
            policy="skip" if scaler_found is not None else self.on_nonfinite,
            fused=bool(getattr(self.optimizer, "_step_supports_amp_scaling", False)),
            loss_scale=getattr(self, "grad_scale", None),
            scaler_found=scaler_found if isinstance(scaler_found, Tensor) else None,
            adaptive=self.adaptive is not None,
        )

    def _effective_stats(
        self, st: GradStats, mode: StepMode, plan: GradPlan
    ) -> tuple[GradStats, Tensor | float]:
        """The statistics of the unscaled gradients with the coefficient this step applies, and
        the threshold it was computed from. Under a loss scale or an adaptive threshold st is
        wide (float64): unscaled and clipped exactly, then narrowed to the gradients' norm dtype."""
        if not mode.wide:
            return st, self._max_norm
        total, norms = st.total_norm, st.norms
        if mode.loss_scale is not None:
            scale = mode.loss_scale.to(device=total.device, dtype=total.dtype)
            total = total / scale
            norms = norms / scale
        adaptive = self.adaptive
        threshold = self._max_norm if adaptive is None else adaptive.threshold(total.device)
        dtype = plan.norm_dtype()
        narrow = narrowed_stats(total, norms, st.counts, st.norm_type, dtype, threshold, mode.skips)
        return narrow, threshold

    def _clip_and_step(self, closure: Callable[[], Any] | None) -> None:
        plan = self._plan()
        params = plan.params_with_grads
        # A rank without gradients still takes part in the process group's collective.
        if not params and self.process_group is None:
            inner_step(self.optimizer, closure)
            return
        mode = self._mode()
        # With a loss scale in the gradients the coefficient is computed after unscaling.
        max_norm = self._max_norm if mode.loss_scale is None else math.inf
        raw = plan.statistics(
            self.norm_type,
            max_norm,
            kernel_policy(mode.policy),
            self.process_group,
            wide=mode.wide,
        )
        self._to_device(raw.total_norm.device)
        stats, threshold = self._effective_stats(raw, mode, plan)
        found = stats.any_nonfinite
        if mode.scaler_found is not None:
            found = found | (mode.scaler_found.to(found.device) > 0)
        run = self._run
        consecutive = torch.where(
            found, run["consecutive"] + 1, torch.zeros_like(run["consecutive"])
        )
        skipped = found & mode.skips
        if self.monitor is not None:
            self.monitor.step(stats=stats, params=params, skipped=skipped)

        # The host learns whether anything was non-finite only where it must (see the module
        # docstring); otherwise the fused kernel or the in-place scale decide on the device.
        found_on_host: bool | None = None
        if self._needs_host(mode):
            flag, streak = torch.stack([found.to(torch.int64), consecutive]).tolist()
            found_on_host = bool(flag)
            self._raise_if_needed(found_on_host, streak, stats, params, mode.policy)

        run["skipped_steps"].add_(skipped.to(torch.int64))
        run["consecutive"].copy_(consecutive)
        if self.adaptive is not None:
            self.adaptive.update(stats.total_norm, found, threshold)
        run.update(stats=stats, skipped=skipped, threshold=threshold, params=params)

        if mode.skips and found_on_host:
            return
        if not mode.fused:
            inplace_step(self.optimizer, plan, stats, mode, closure)
            return
        device_skip = found if mode.skips and found_on_host is None else None
        fused_step(self.optimizer, plan, stats, mode, device_skip, closure)
        # Once a fused step has been taken without a device-side skip flag, later skips can be
        # left to the device (see the module docstring).
        run["fused_ready"] = run["fused_ready"] or device_skip is None

    def _clip_evaluation(self) -> None:
        """Clips the gradients of a later closure evaluation within a step by the same rule (the
        step's threshold; NaN/Inf zeroed under "zero", left unclipped under "skip" and "error":
        the step was decided on its first evaluation)."""
        plan = self._plan()
        if not plan.params_with_grads and self.process_group is None:
            return
        policy = self.on_nonfinite if self.on_nonfinite in ("zero", "propagate") else "skip"
        threshold = self._run["threshold"]
        fixed = not isinstance(threshold, Tensor)
        limit = threshold if fixed else math.inf
        st = plan.statistics(self.norm_type, limit, policy, self.process_group)
        coef = st.clip_coef
        if not fixed:
            skip = st.any_nonfinite if policy == "skip" else None
            coef = clip_coef(st.total_norm, threshold, skip)
        plan.apply_clip(coef, st.nonfinite if policy == "zero" else None)

    def _needs_host(self, mode: StepMode) -> bool:
        device_can_skip = mode.fused and self._run["fused_ready"]
        return (
            mode.policy == "error"
            or self.max_consecutive_nonfinite is not None
            or (mode.skips and not device_can_skip)
        )

    def _raise_if_needed(
        self, found: bool, run: int, stats: GradStats, params: list[Tensor], policy: str
    ) -> None:
        """Raises before anything is changed (the step's counters are not committed either)."""
        if not found:
            return
        limit = self.max_consecutive_nonfinite
        if policy == "error":
            head = "the gradients hold NaN or Inf (on_nonfinite='error')"
        elif limit is not None and run >= limit:
            head = (
                f"the gradients held NaN or Inf in {run} consecutive steps "
                f"(max_consecutive_nonfinite={limit})"
            )
        else:
            return
        grads = [p.grad for p in params]
        report = nonfinite_report(stats, grads, self._param_names(params))
        raise RuntimeError(
            f"ClipGradOptimizer.step: {head}, so this step was not taken; parameters, optimizer "
            f"state and gradients are unchanged.\n{report}\n"
            "on_nonfinite='skip' skips such steps; on_nonfinite='zero' zeroes the NaN/Inf "
            "elements and steps."
        )

    def stats_dict(self) -> dict[str, Any]:
        """Python numbers of the last step for logging (syncs: it copies them to the host).

        Keys: those of GradStats.to_dict() (norms and non-finite counts keyed by parameter name),
        plus max_norm (the threshold used), skipped (this step), skipped_steps and
        consecutive_nonfinite. The names are the model's when the inner optimizer was given
        model.named_parameters() (torch keeps them in its param_groups), else "param_groups[i][j]".
        """
        run = self._run
        device = run["skipped_steps"].device
        # float64 holds every counter and the threshold exactly: one copy to the host for them all.
        values = [run["skipped_steps"], run["consecutive"], run["skipped"]]
        values.append(torch.as_tensor(run["threshold"], device=device))
        skipped_steps, streak, skipped, threshold = torch.stack(
            [v.to(device, torch.float64) for v in values]
        ).tolist()
        out: dict[str, Any] = {
            "skipped_steps": int(skipped_steps),
            "consecutive_nonfinite": int(streak),
        }
        if run["stats"] is None:
            return out
        logged = run["stats"].to_dict(self._param_names(run["params"]))
        return {**logged, "max_norm": threshold, "skipped": bool(skipped), **out}

    def state_dict(self) -> dict[str, Any]:
        """The wrapped optimizer's state dict plus one key, STATE_KEY, holding the wrapper's state
        (skipped-step counters, AdaptiveClip statistics). A plain optimizer loads it unchanged."""
        for pre_hook in self._optimizer_state_dict_pre_hooks.values():
            pre_hook(self)
        state_dict = self.optimizer.state_dict()
        state_dict[STATE_KEY] = wrapper_state(self._run, self.adaptive)
        for post_hook in self._optimizer_state_dict_post_hooks.values():
            hooked = post_hook(self, state_dict)
            if hooked is not None:
                state_dict = hooked
        return state_dict

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Loads a state dict made by this wrapper or by a plain optimizer (the wrapper's counters
        then start at 0 and adaptive clipping warms up again). Raises, changing nothing, when the
        wrapper's part does not fit."""
        state_dict = dict(state_dict)
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            hooked = pre_hook(self, state_dict)
            if hooked is not None:
                state_dict = dict(hooked)
        own = state_dict.pop(STATE_KEY, None)
        skipped, consecutive, adaptive = parse_wrapper_state(own, self.adaptive)
        self.optimizer.load_state_dict(state_dict)
        self._run.update(skipped_steps=skipped, consecutive=consecutive, fused_ready=False)
        if self.adaptive is not None:
            if adaptive is None:
                self.adaptive.reset()
            else:
                self.adaptive.load_state_dict(adaptive)
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)
