"""ClipGradOptimizer's part of a state dict: its counters and AdaptiveClip's statistics, under one
key next to the wrapped optimizer's state, so that plain optimizers and the wrapper load each
other's checkpoints."""

from __future__ import annotations

import numbers
from typing import Any

import torch
from torch import Tensor

from gradstats.optim.adaptive import AdaptiveClip

# The one top-level key that ClipGradOptimizer.state_dict() adds to the wrapped optimizer's.
STATE_KEY = "gradstats_clip"
_COUNTERS = {"skipped_steps": "skipped_steps", "consecutive_nonfinite": "consecutive"}
_INT64_MAX = torch.iinfo(torch.int64).max


def wrapper_state(run: dict[str, Any], adaptive: AdaptiveClip | None) -> dict[str, Any]:
    """The wrapper's state to save, from its per-run dict."""
    state: dict[str, Any] = {key: run[field].detach().clone() for key, field in _COUNTERS.items()}
    state["adaptive_clip"] = None if adaptive is None else adaptive.state_dict()
    return state


def parse_wrapper_state(
    own: dict[str, Any] | None, adaptive: AdaptiveClip | None
) -> tuple[Tensor, Tensor, dict[str, Any] | None]:
    """(skipped steps, consecutive non-finite steps, AdaptiveClip state) from a saved wrapper
    state; zeros and None from a plain optimizer's state dict (own is None). Raises, changing
    nothing, when it does not fit."""
    if own is None:
        zero = torch.zeros((), dtype=torch.int64)
        return zero, zero.clone(), None
    if not isinstance(own, dict):
        raise TypeError(f"state_dict[{STATE_KEY!r}] must be a dict; got {type(own).__name__}")
    counters = []
    for key in _COUNTERS:
        if key not in own:
            raise ValueError(f"state_dict[{STATE_KEY!r}] lacks {key!r}")
        counters.append(_counter(key, own[key]))
    saved = own.get("adaptive_clip")
    if saved is not None and adaptive is not None:
        adaptive.parse_state(saved)
    return counters[0], counters[1], saved


def _counter(key: str, value: Any) -> Tensor:
    """A saved counter as a 0-dim int64 tensor (on the device it was saved on); raises when it is
    not a count: bools (True is no count), negatives, text, floats, several values."""
    count = None
    if isinstance(value, Tensor):
        integral = not (
            value.is_floating_point() or value.is_complex() or value.dtype == torch.bool
        )
        if value.numel() == 1 and integral:
            count = value.detach().reshape(()).to(torch.int64, copy=True)
    elif isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= 0:
        # Beyond int64 it is no count this wrapper saved either.
        count = torch.tensor(int(value), dtype=torch.int64) if value <= _INT64_MAX else None
    if count is None or int(count) < 0:
        got = repr(value) if isinstance(value, Tensor) else f"{value!r} ({type(value).__name__})"
        raise ValueError(
            f"state_dict[{STATE_KEY!r}][{key!r}] must be one integer >= 0 (an int or a "
            f"one-element integer tensor, as ClipGradOptimizer.state_dict() saves it); got {got}"
        )
    return count
