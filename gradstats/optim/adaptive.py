"""AdaptiveClip: a clip threshold that follows the recent gradient norms, kept on the device."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from gradstats._core import check_int, check_max_norm

ADAPTIVE_MODES = ("zscore", "percentile")
_PERCENT = 100.0


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
        check_int("AdaptiveClip: history", history, 1)
        check_int("AdaptiveClip: warmup_steps", warmup_steps, 1)
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
        self._state = self.parse_state(state_dict)

    def reset(self) -> None:
        """Forgets the statistics: the next steps warm up again."""
        self._state = self._initial_state()

    def parse_state(self, state_dict: dict[str, Any]) -> dict[str, Tensor]:
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
