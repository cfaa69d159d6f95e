"""The flight recorder: what led to the first NaN/Inf or exploding step, kept beyond the window.

The trigger is checked on the device every half window (no per-step cost, no host sync), over the
steps that half window added: the first step whose gradients, watched inputs or watched outputs held
NaN/Inf, or whose total norm exploded. The last `steps` gradient rows up to it, the site rows of
those steps and that step's per-feature input statistics are then copied, still on the device,
before the rings overwrite them. Reading back (dump) finds a trigger since the last check in the
rings themselves, with the same function.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from gradstats import ops
from gradstats._files import write_whole
from gradstats.monitor.history import Finding, MonitorHistory, MonitorThresholds
from gradstats.monitor.rings import NEVER

# The dump's JSON: one space per level keeps the per-step tables readable and short.
_JSON_INDENT = 1
# What tripped the recorder, in the order they are checked; the index is stored on the device.
TRIGGERS = ("nonfinite_gradients", "nonfinite_activations", "exploding_gradients")


def first_trigger(
    steps: Tensor,
    total: Tensor,
    grad_bad: Tensor,
    site_bad: Tensor,
    candidate: Tensor,
    th: MonitorThresholds,
) -> tuple[Tensor, Tensor]:
    """The first candidate step that trips the recorder (NEVER: none) and why (an index of
    TRIGGERS), as 0-dim tensors on the rows' device: NaN/Inf gradients, NaN/Inf inputs or outputs,
    or a total norm above explode_factor x the median of the finite total norms of all the rows
    given (once min_history of them exist) or above explode_abs_limit."""
    finite = torch.isfinite(total)
    median = torch.where(finite, total, math.nan).nanmedian()
    trusted = finite.sum() >= th.min_history
    exploding = (trusted & (total > th.explode_factor * median)) | (total > th.explode_abs_limit)
    why = torch.stack([grad_bad, site_bad, exploding & finite])  # [3, k]
    tripped = why.any(0) & candidate
    step = torch.where(tripped, steps, NEVER).amin()
    row = torch.where(tripped, torch.arange(steps.numel(), device=steps.device), NEVER).amin()
    reason = why[:, row.clamp(max=steps.numel() - 1)].int().argmax()
    return step, reason


class FlightRecorder:
    """The device side: the trigger step (NEVER until one), its reason, and the copies."""

    def __init__(self, steps: int, device: torch.device) -> None:
        self.steps = steps
        self.step = torch.full((), NEVER, dtype=torch.int64, device=device)
        self.reason = torch.zeros((), dtype=torch.int64, device=device)
        self.copies: dict[str, Tensor] = {}

    def capture(self, step: Tensor, reason: Tensor, sources: dict[str, tuple[Tensor, Tensor]]):
        """Where no trigger was kept yet and `step` is one, keeps it and, for each source (ring,
        row indices), the ring's rows at those indices (gathered on the device)."""
        take = (self.step == NEVER) & (step != NEVER)
        for name, (ring, rows) in sources.items():
            taken = ring.index_select(0, rows)
            kept = self.copies.get(name)
            if kept is None or kept.shape != taken.shape:
                blank = torch.full_like(taken, math.nan if taken.is_floating_point() else 0)
                kept = blank if kept is None else _fit(kept, taken.shape, blank)
            self.copies[name] = torch.where(take, taken, kept)
        torch.where(take, reason, self.reason, out=self.reason)
        torch.where(take, step, self.step, out=self.step)

    def check(
        self,
        step: int,
        n: int,
        sources: dict[str, Tensor],
        feature_rings: list[Tensor],
        th: MonitorThresholds,
    ) -> None:
        """At `step`, a multiple of half the window: the first step of the half window just ended
        that trips the recorder, and copies of the rows of every ring in sources up to it. The
        gradient ring (sources["grads"], n parameters) sets the window; site counts come from
        sources["site_counts"] and the feature rings (NaN and Inf rows)."""
        grads = sources["grads"]
        w, device = grads.shape[0], grads.device
        steps = torch.arange(step - w, step, device=device)
        rows = torch.remainder(steps, w)  # the ring row of each step, oldest first
        chrono = grads.index_select(0, rows)
        site_bad = torch.zeros(w, dtype=torch.bool, device=device)
        if "site_counts" in sources:
            site_bad |= sources["site_counts"].index_select(0, rows).sum((1, 2)) > 0
        for ring in feature_rings:
            site_bad |= ring.index_select(0, rows)[:, ops.FEATURE_NONFINITE_ROWS].sum((1, 2)) > 0
        found, reason = first_trigger(
            steps,
            chrono[:, 3 * n],
            chrono[:, n : 3 * n].sum(1) > 0,
            site_bad,
            steps >= step - w // 2,
            th,
        )
        offsets = torch.arange(1 - self.steps, 1, device=device)
        taken = torch.remainder(found.clamp(max=step - 1) + offsets, w)
        self.capture(found, reason, {name: (ring, taken) for name, ring in sources.items()})

    def buffers(self) -> list[Tensor]:
        return [self.step, self.reason, *self.copies.values()]


def _fit(kept: Tensor, shape: torch.Size, blank: Tensor) -> Tensor:
    """kept placed in a blank of a larger shape (the site columns grew since it was taken)."""
    out = blank.clone()
    out[tuple(slice(0, n) for n in kept.shape)] = kept
    return out


@dataclasses.dataclass(frozen=True)
class FlightRecord:
    """A flight record on the host: the trigger step and reason, and the steps before it."""

    step: int
    reason: str
    steps: list[int]
    data: dict[str, Any]


def record_from_history(h: MonitorHistory, th: MonitorThresholds, steps: int):
    """The flight record found in a history (the rings as read back), or None."""
    if h.steps.size == 0:
        return None
    n = h.steps.size
    site_rows = np.searchsorted(h.site_steps, h.steps)
    site_bad = (h.site_nan + h.site_inf)[site_rows].sum(axis=1) > 0
    step, reason = first_trigger(
        torch.from_numpy(h.steps),
        torch.from_numpy(h.total_norm.copy()),
        torch.from_numpy((h.grad_nan + h.grad_inf).sum(axis=1) > 0),
        torch.from_numpy(site_bad),
        torch.ones(n, dtype=torch.bool),
        th,
    )
    if int(step) >= NEVER:
        return None
    at = int(np.nonzero(h.steps == int(step))[0][0])
    rows = np.arange(max(0, at - steps + 1), at + 1)
    site_at = np.nonzero(h.site_steps == int(step))[0]
    return FlightRecord(
        int(step), TRIGGERS[int(reason)], h.steps[rows].tolist(), tables(h, rows, site_at)
    )


def tables(h: MonitorHistory, rows: np.ndarray, site_at: np.ndarray) -> dict[str, Any]:
    """The gradient and site statistics of the given gradient rows, and the per-feature input
    statistics of the site row site_at (empty: none), as lists for JSON."""
    site_rows = np.searchsorted(h.site_steps, h.steps[rows])
    data: dict[str, Any] = {
        "parameters": list(h.names),
        "total_norm": h.total_norm[rows],
        "clip_coef": h.clip_coef[rows],
        "grad_norm": h.grad_norms[rows],
        "grad_nan": h.grad_nan[rows],
        "grad_inf": h.grad_inf[rows],
        "sites": list(h.sites),
        "site_max_abs": h.site_max_abs[site_rows],
        "site_nan": h.site_nan[site_rows],
        "site_inf": h.site_inf[site_rows],
        "inputs": {},
    }
    for f in h.features:
        if site_at.size:
            r = int(site_at[0])
            data["inputs"][f.site] = {
                "feature_dim": f.dim,
                **{k: getattr(f, k)[r] for k in ("count", "mean", "rms", "low", "high", "nan")},
                "inf": f.inf[r],
            }
    return data


def write_dump(
    path: Path,
    record: FlightRecord | None,
    h: MonitorHistory,
    findings: list[Finding],
    report: str,
) -> Path:
    """Writes the flight record (or, with none, the last steps kept) as JSON: whole or not at
    all."""
    payload = {
        "trigger": None
        if record is None
        else {"step": record.step, "reason": record.reason, "steps": record.steps},
        "flight": None if record is None else record.data,
        "findings": [dataclasses.asdict(f) for f in findings],
        "report": report,
    }
    text = json.dumps(payload, default=_jsonable, indent=_JSON_INDENT, allow_nan=True) + "\n"
    return write_whole(path, lambda temporary: temporary.write_text(text))


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    raise TypeError(f"cannot write {type(value).__name__} to JSON")
