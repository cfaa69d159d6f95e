"""ClipGradOptimizer's part of a state dict: its counters and AdaptiveClip's statistics, under one
key next to the wrapped optimizer's state, so that plain optimizers and the wrapper load each
other's checkpoints."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from gradstats.optim.adaptive import AdaptiveClip

# The one top-level key that ClipGradOptimizer.state_dict() adds to the wrapped optimizer's.
STATE_KEY = "gradstats_clip"
_COUNTERS = {"skipped_steps": "skipped_steps", "consecutive_nonfinite": "consecutive"}


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
        value = torch.as_tensor(own[key]).detach()
        if value.numel() != 1 or value.is_floating_point() or value.is_complex():
            raise ValueError(
                f"state_dict[{STATE_KEY!r}][{key!r}] must be one integer; got {own[key]!r}"
            )
        counters.append(value.reshape(()).to(torch.int64, copy=True))
    saved = own.get("adaptive_clip")
    if saved is not None and adaptive is not None:
        adaptive.parse_state(saved)
    return counters[0], counters[1], saved
