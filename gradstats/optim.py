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

from gradstats.clip import apply_clip, check_on_nonfinite, nonfinite_report
from gradstats.distributed import check_process_group, local_tensors
from gradstats.stats import CLIP_EPS, GradStats, check_max_norm, check_norm_type, compute

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

# The one top-level key that ClipGradOptimizer.state_dict() adds to the wrapped optimizer's.
STATE_KEY = "gradstats_clip"

ADAPTIVE_MODES = ("zscore", "percentile")
_PERCENT = 100.0


class StepMonitor(Protocol):
    """What `monitor=` must provide (gradstats.GradMonitor does)."""

    def step(self, *, stats: GradStats, params: list[Tensor], skipped: Tensor) -> object: ...


class AdaptiveClip:
    """A clip threshold that follows the recent gradient norms, kept on the device.

    mode="zscore" (the ZClip idea, Kumar et al. 2025): running mean and variance of the total norm,
    exact averages during the first `warmup_steps` steps and then exponential moving averages with
    weight 1 - `ema_decay`; the threshold is mean + `z_threshold` * std. The statistics are updated
    with the clipped norm, so a spike does not raise the threshold that follows it.

    mode="percentile" (the AutoClip idea, Seetharaman et al. 2020): the threshold is the
    `percentile`-th percentile (linear interpolation) of the last `history` total norms, kept in a
    ring buffer on the device.

    Both: until `warmup_steps` finite steps have been seen the threshold is `max_norm`, which also
    caps it afterwards (default: no cap). Steps with NaN/Inf gradients leave the statistics
    unchanged. The threshold of a step comes from the norms before it. Updates are device ops only
    (no host sync); the state is saved in ClipGradOptimizer.state_dict(). Give each
    ClipGradOptimizer its own AdaptiveClip.
    """

    def __init__(
        self,
        mode: str = "zscore",
        *,
        z_threshold: float = 2.5,
        ema_decay: float = 0.97,
        percentile: float = 95.0,
        history: int = 1000,
        warmup_steps: int = 25,
        max_norm: float = math.inf,
    ) -> None:
        if mode not in ADAPTIVE_MODES:
            raise ValueError(f"AdaptiveClip: mode must be one of {ADAPTIVE_MODES}; got {mode!r}")
        if not z_threshold > 0:
            raise ValueError(f"AdaptiveClip: z_threshold must be > 0; got {z_threshold!r}")
        if not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"AdaptiveClip: ema_decay must be in [0, 1); got {ema_decay!r}")
        if not 0.0 <= percentile <= _PERCENT:
            raise ValueError(f"AdaptiveClip: percentile must be in [0, 100]; got {percentile!r}")
        if isinstance(history, bool) or not isinstance(history, int) or history < 1:
            raise ValueError(f"AdaptiveClip: history must be an int >= 1; got {history!r}")
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 1:
            raise ValueError(
                f"AdaptiveClip: warmup_steps must be an int >= 1; got {warmup_steps!r}"
            )
        self.mode = mode
        self.z_threshold = float(z_threshold)
        self.ema_decay = float(ema_decay)
        self.percentile = float(percentile)
        self.history = history
        self.warmup_steps = warmup_steps
        self.max_norm = check_max_norm(max_norm)
        self._state = self._initial_state()

    def __repr__(self) -> str:
        if self.mode == "zscore":
            detail = f"z_threshold={self.z_threshold}, ema_decay={self.ema_decay}"
        else:
            detail = f"percentile={self.percentile}, history={self.history}"
        return (
            f"AdaptiveClip(mode={self.mode!r}, {detail}, warmup_steps={self.warmup_steps}, "
            f"max_norm={self.max_norm})"
        )

    def _initial_state(self) -> dict[str, Tensor]:
        state = {"count": torch.zeros((), dtype=torch.int64)}
        if self.mode == "zscore":
            state["mean"] = torch.zeros((), dtype=torch.float32)
            state["var"] = torch.zeros((), dtype=torch.float32)
        else:
            # NaN marks an empty slot: nanquantile ignores it, so no host-side fill count is needed.
            state["norms"] = torch.full((self.history,), math.nan, dtype=torch.float32)
        return state

    def _to(self, device: torch.device) -> None:
        if self._state["count"].device != device:
            self._state = {k: v.to(device) for k, v in self._state.items()}

    @property
    def steps_seen(self) -> Tensor:
        """Number of finite steps the statistics hold (0-dim int64, on the device)."""
        return self._state["count"]

    def threshold(self, device: torch.device) -> Tensor:
        """The clip threshold for the next step (0-dim float32 on `device`); no sync."""
        self._to(device)
        s = self._state
        if self.mode == "zscore":
            adaptive = s["mean"] + self.z_threshold * torch.sqrt(s["var"])
        else:
            adaptive = torch.nanquantile(s["norms"], self.percentile / _PERCENT)
        uncapped = torch.where(
            s["count"] >= self.warmup_steps, adaptive, torch.full_like(adaptive, math.inf)
        )
        return torch.clamp(uncapped, max=self.max_norm)

    def update(self, total_norm: Tensor, nonfinite: Tensor, threshold: Tensor) -> None:
        """Folds this step's total norm in, unless `nonfinite` (a 0-dim bool) is set; no sync."""
        s = self._state
        keep = nonfinite | ~torch.isfinite(total_norm)
        norm = total_norm.to(torch.float32)
        if self.mode == "zscore":
            norm = torch.minimum(norm, threshold.to(torch.float32))
            # Weight 1/n is the exact running mean and (population) variance; 1 - decay is the EMA.
            weight = torch.clamp(
                torch.reciprocal((s["count"] + 1).to(torch.float32)), min=1.0 - self.ema_decay
            )
            delta = norm - s["mean"]
            mean = s["mean"] + weight * delta
            var = (1.0 - weight) * (s["var"] + weight * delta * delta)
            s["mean"].copy_(torch.where(keep, s["mean"], mean))
            s["var"].copy_(torch.where(keep, s["var"], var))
        else:
            slot = torch.remainder(s["count"], self.history).reshape(1)
            old = s["norms"].gather(0, slot)
            s["norms"].scatter_(0, slot, torch.where(keep, old, norm.reshape(1)))
        s["count"].add_((~keep).to(torch.int64))

    def state_dict(self) -> dict[str, Any]:
        config = {"mode": self.mode, "history": self.history, "warmup_steps": self.warmup_steps}
        return {**config, **{k: v.detach().clone() for k, v in self._state.items()}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._state = self._parse_state(state_dict)

    def reset(self) -> None:
        """Forgets the statistics: the next steps warm up again."""
        self._state = self._initial_state()

    def _parse_state(self, state_dict: dict[str, Any]) -> dict[str, Tensor]:
        """The state `state_dict` describes, checked against this AdaptiveClip; raises, changing
        nothing, when it does not fit."""
        if not isinstance(state_dict, dict):
            raise TypeError(f"AdaptiveClip state must be a dict; got {type(state_dict).__name__}")
        if state_dict.get("mode") != self.mode:
            raise ValueError(
                f"AdaptiveClip: the checkpoint holds mode={state_dict.get('mode')!r} state, this "
                f"AdaptiveClip has mode={self.mode!r}"
            )
        expected = self._initial_state()
        missing = sorted(set(expected) - set(state_dict))
        if missing:
            raise ValueError(f"AdaptiveClip: the checkpoint state lacks {missing}")
        state = {}
        for key, like in expected.items():
            value = torch.as_tensor(state_dict[key]).detach()
            if value.shape != like.shape:
                raise ValueError(
                    f"AdaptiveClip: checkpoint {key!r} has shape {tuple(value.shape)}, expected "
                    f"{tuple(like.shape)} (history={self.history})"
                )
            state[key] = value.to(dtype=like.dtype, copy=True)
        return state


@torch.compiler.disable
def _step_with_grad_scale(
    optimizer: Optimizer, grad_scale: Tensor, found_inf: Tensor | None
) -> None:
    """optimizer.step() with the grad_scale/found_inf attributes that fused optimizers read.

    Kept out of torch.compile graphs: dynamo (torch 2.14) inlines the inner step without the
    attributes set in the same compiled region (the step then neither clips nor skips), and fails
    on deleting them. The fused step is one kernel launch per device, so nothing is lost.
    """
    optimizer.grad_scale = grad_scale
    optimizer.found_inf = found_inf
    try:
        optimizer.step()
    finally:
        del optimizer.grad_scale
        del optimizer.found_inf


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
        if max_consecutive_nonfinite is not None and (
            isinstance(max_consecutive_nonfinite, bool)
            or not isinstance(max_consecutive_nonfinite, int)
            or max_consecutive_nonfinite < 1
        ):
            raise ValueError(
                "max_consecutive_nonfinite must be None or an int >= 1; got "
                f"{max_consecutive_nonfinite!r}"
            )
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
        self.last_stats: GradStats | None = None
        self._skipped = torch.zeros((), dtype=torch.int64)
        self._consecutive = torch.zeros((), dtype=torch.int64)
        self._last_skipped = torch.zeros((), dtype=torch.bool)
        self._last_threshold: Tensor | float = self._max_norm
        self._last_params: list[Tensor] = []
        # False until the inner (fused) optimizer has taken a step: see the module docstring.
        self._fused_ready = False
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
    def skipped_steps(self) -> Tensor:
        """Steps skipped for NaN/Inf gradients so far (0-dim int64 on the device)."""
        return self._skipped

    @property
    def consecutive_nonfinite(self) -> Tensor:
        """Steps in a row, up to the last one, whose gradients held NaN/Inf (0-dim int64)."""
        return self._consecutive

    def __repr__(self) -> str:
        return (
            f"ClipGradOptimizer(max_norm={self.max_norm!r}, norm_type={self.norm_type}, "
            f"on_nonfinite={self.on_nonfinite!r}, optimizer={self.optimizer!r})"
        )

    def __getstate__(self) -> dict[str, Any]:
        return self.__dict__.copy()

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._patch_step_function()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        self.optimizer.add_param_group(param_group)
        self._fused_ready = False

    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """Statistics of every gradient in one fused pass, clip, then the inner step (or a skip).

        Returns what the closure returned (None without one).
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        with torch.no_grad():
            self._clip_and_step()
        return loss

    def _params_with_grads(self) -> list[Tensor]:
        return [p for g in self.param_groups for p in g["params"] if p.grad is not None]

    def _param_names(self, params: list[Tensor]) -> list[str]:
        """Names from named_parameters() when the groups have them, else param_groups[i][j]."""
        names: dict[int, str] = {}
        for i, group in enumerate(self.param_groups):
            given = group.get("param_names")
            for j, p in enumerate(group["params"]):
                names[id(p)] = given[j] if given is not None else f"param_groups[{i}][{j}]"
        return [names[id(p)] for p in params]

    def _to_device(self, device: torch.device) -> None:
        if self._skipped.device != device:
            self._skipped = self._skipped.to(device)
            self._consecutive = self._consecutive.to(device)

    def _effective_stats(
        self, st: GradStats, loss_scale: Tensor | None, policy: str
    ) -> tuple[GradStats, Tensor | float]:
        """The statistics of the unscaled gradients with the coefficient this step applies, and
        the threshold it was computed from."""
        if loss_scale is None and self.adaptive is None:
            return st, self._max_norm
        total, norms = st.total_norm, st.norms
        if loss_scale is not None:
            scale = loss_scale.to(device=total.device, dtype=total.dtype)
            total = total / scale
            norms = norms / scale
        if self.adaptive is not None:
            threshold: Tensor | float = self.adaptive.threshold(total.device)
            limit = threshold.to(total.dtype)
        else:
            threshold = limit = self._max_norm
        # The kernel's formula (csrc/stats.h clip_coefficient), on the device.
        coef = torch.clamp(torch.reciprocal(total + CLIP_EPS) * limit, max=1.0)
        if policy == "skip":
            coef = torch.where(st.nonfinite_count > 0, torch.ones_like(coef), coef)
        return GradStats(total, coef, norms, st.counts, st.norm_type), threshold

    def _clip_and_step(self) -> None:
        params = self._params_with_grads()
        # A rank without gradients still takes part in the process group's collective.
        if not params and self.process_group is None:
            self.optimizer.step()
            return
        grads = [p.grad for p in params]
        # Set by GradScaler.step: the loss scale still in the gradients (None once unscale_ was
        # called) and its overflow flag.
        loss_scale: Tensor | None = getattr(self, "grad_scale", None)
        scaler_found = getattr(self, "found_inf", None)
        scaled = scaler_found is not None
        policy = "skip" if scaled else self.on_nonfinite
        skips = policy == "skip"
        fused = bool(getattr(self.optimizer, "_step_supports_amp_scaling", False))

        max_norm = self._max_norm if loss_scale is None else math.inf
        kernel_policy = "propagate" if policy == "error" else policy
        raw = compute(grads, self.norm_type, max_norm, kernel_policy, self.process_group)
        grads = local_tensors(grads)
        device = raw.total_norm.device
        self._to_device(device)
        stats, threshold = self._effective_stats(raw, loss_scale, policy)
        found = stats.nonfinite_count > 0
        if isinstance(scaler_found, Tensor):
            found = found | (scaler_found.to(device) > 0)
        consecutive = torch.where(found, self._consecutive + 1, torch.zeros_like(self._consecutive))

        skipped = found & skips
        if self.monitor is not None:
            self.monitor.step(stats=stats, params=params, skipped=skipped)

        needs_host = (
            policy == "error"
            or self.max_consecutive_nonfinite is not None
            or (skips and not (fused and self._fused_ready))
        )
        found_on_host: bool | None = None
        if needs_host:
            flag, run = torch.stack([found.to(torch.int64), consecutive]).tolist()
            found_on_host = bool(flag)
            self._raise_if_needed(found_on_host, run, stats, params, policy)

        self._skipped.add_(skipped.to(torch.int64))
        self._consecutive.copy_(consecutive)
        if self.adaptive is not None:
            self.adaptive.update(stats.total_norm, found, threshold)
        self.last_stats = stats
        self._last_skipped = skipped
        self._last_threshold = threshold
        self._last_params = params

        if skips and found_on_host:
            return
        if fused:
            device_decides = skips and found_on_host is None
            self._fused_step(grads, stats, loss_scale, found if device_decides else None, policy)
        else:
            self._inplace_step(grads, stats, loss_scale, policy)

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

    def _fused_step(
        self,
        grads: list[Tensor],
        stats: GradStats,
        loss_scale: Tensor | None,
        found: Tensor | None,
        policy: str,
    ) -> None:
        """Hands the clip (and the loss scale) to the fused kernel, which divides the gradients by
        grad_scale and returns early where found_inf is 1."""
        coef = stats.clip_coef.to(torch.float32)
        if policy == "zero":
            apply_clip(grads, torch.ones_like(coef), stats.nonfinite)
        if loss_scale is None:
            grad_scale = torch.reciprocal(coef)
        else:
            grad_scale = loss_scale.to(coef.device, torch.float32) / coef
        _step_with_grad_scale(
            self.optimizer, grad_scale, None if found is None else found.to(torch.float32)
        )
        if found is None:
            self._fused_ready = True

    def _inplace_step(
        self, grads: list[Tensor], stats: GradStats, loss_scale: Tensor | None, policy: str
    ) -> None:
        if loss_scale is None:
            apply_clip(grads, stats.clip_coef, stats.nonfinite if policy == "zero" else None)
        else:
            # Unscaling must multiply even when the factor is >= 1, which the fused scale skips.
            factor = stats.clip_coef / loss_scale.to(stats.clip_coef.device, stats.clip_coef.dtype)
            groups: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
            for g in grads:
                groups.setdefault((g.device, g.dtype), []).append(g)
            for (dev, _), group in groups.items():
                torch._foreach_mul_(group, factor.to(dev))
        self.optimizer.step()

    def stats_dict(self) -> dict[str, Any]:
        """Python numbers of the last step for logging (syncs: it copies them to the host).

        Keys: those of GradStats.to_dict() (norms and non-finite counts keyed by parameter name),
        plus max_norm (the threshold used), skipped (this step), skipped_steps and
        consecutive_nonfinite.
        """
        device = self._skipped.device
        # float64 holds every counter and the threshold exactly: one copy to the host for them all.
        values = [self._skipped, self._consecutive, self._last_skipped]
        values.append(torch.as_tensor(self._last_threshold, device=device))
        skipped_steps, run, skipped, threshold = torch.stack(
            [v.to(device, torch.float64) for v in values]
        ).tolist()
        out: dict[str, Any] = {
            "skipped_steps": int(skipped_steps),
            "consecutive_nonfinite": int(run),
        }
        if self.last_stats is None:
            return out
        logged = self.last_stats.to_dict(self._param_names(self._last_params))
        return {**logged, "max_norm": threshold, "skipped": bool(skipped), **out}

    def _wrapper_state(self) -> dict[str, Any]:
        return {
            "skipped_steps": self._skipped.detach().clone(),
            "consecutive_nonfinite": self._consecutive.detach().clone(),
            "adaptive_clip": None if self.adaptive is None else self.adaptive.state_dict(),
        }

    def state_dict(self) -> dict[str, Any]:
        """The wrapped optimizer's state dict plus one key, STATE_KEY, holding the wrapper's state
        (skipped-step counters, AdaptiveClip statistics). A plain optimizer loads it unchanged."""
        for pre_hook in self._optimizer_state_dict_pre_hooks.values():
            pre_hook(self)
        state_dict = self.optimizer.state_dict()
        state_dict[STATE_KEY] = self._wrapper_state()
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
        skipped, consecutive, adaptive = self._parse_wrapper_state(own)
        self.optimizer.load_state_dict(state_dict)
        self._skipped, self._consecutive = skipped, consecutive
        if self.adaptive is not None:
            if adaptive is None:
                self.adaptive.reset()
            else:
                self.adaptive.load_state_dict(adaptive)
        self._fused_ready = False
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    def _parse_wrapper_state(
        self, own: dict[str, Any] | None
    ) -> tuple[Tensor, Tensor, dict[str, Any] | None]:
        if own is None:
            zero = torch.zeros((), dtype=torch.int64)
            return zero, zero.clone(), None
        if not isinstance(own, dict):
            raise TypeError(f"state_dict[{STATE_KEY!r}] must be a dict; got {type(own).__name__}")
        counters = []
        for key in ("skipped_steps", "consecutive_nonfinite"):
            if key not in own:
                raise ValueError(f"state_dict[{STATE_KEY!r}] lacks {key!r}")
            value = torch.as_tensor(own[key]).detach()
            if value.numel() != 1 or value.is_floating_point() or value.is_complex():
                raise ValueError(
                    f"state_dict[{STATE_KEY!r}][{key!r}] must be one integer; got {own[key]!r}"
                )
            counters.append(value.reshape(()).to(torch.int64, copy=True))
        saved = own.get("adaptive_clip")
        if saved is not None and self.adaptive is not None:
            self.adaptive._parse_state(saved)
        return counters[0], counters[1], saved
