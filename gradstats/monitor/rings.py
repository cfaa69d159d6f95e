"""The monitor's ring buffers on the device: one row per step, `window` rows, written without any
host synchronisation and read back in one copy.

A step costs one torch.cat into the gradient ring plus a reset of the site rows; a hook call costs
the fused op plus a few small writes. Each small op costs microseconds of CPU time, so there are as
few as possible: the first-step-with-NaN latches are brought up to date once every `window` steps
(fold), just before a ring starts to overwrite.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from gradstats import ops
from gradstats._core import INF_ROW, NAN_ROW, NONFINITE_ROW

# "Never" in the first-step-with-NaN latches: a power of two, so that the float64 snapshot holds it
# exactly, and larger than any step.
NEVER = 2**62
# A gradient ring row ends with the total norm, the clip coefficient and the skipped flag.
GRAD_SCALARS = 3
# Cached index tensors (column layouts of parameter lists and of hook calls).
_INDEX_CACHE_SIZE = 64


def normal_tensors() -> torch.inference_mode:
    """Buffers made during an inference_mode forward must still take in-place updates later."""
    return torch.inference_mode(False)


def fold(latch: Tensor, bad: Tensor, first_step: int) -> None:
    """latch = min(latch, the first step whose row in bad [window, ...] is set), on the device;
    row r of bad is step first_step + r."""
    shape = (bad.shape[0],) + (1,) * (bad.dim() - 1)
    steps = torch.arange(first_step, first_step + bad.shape[0], device=bad.device).reshape(shape)
    torch.minimum(latch, torch.where(bad, steps, NEVER).amin(0), out=latch)


def first_step(latch: np.ndarray, bad_counts: np.ndarray, steps: np.ndarray) -> np.ndarray:
    """The first step with NaN/Inf per column, from the latch and the kept rows; -1 for never."""
    bad = bad_counts > 0
    in_rows = np.where(bad.any(axis=0), steps[np.argmax(bad, axis=0)] if steps.size else 0, NEVER)
    first = np.minimum(latch, in_rows)
    return np.where(first >= NEVER, -1, first).astype(np.int64)


def grow_columns(t: Tensor, size: int, fill: float | bool) -> Tensor:
    """t with its last dimension grown to size, the new columns set to fill."""
    grown = torch.full((*t.shape[:-1], size), fill, dtype=t.dtype, device=t.device)
    grown[..., : t.shape[-1]].copy_(t)
    return grown


def kept_steps(num_steps: int, window: int) -> np.ndarray:
    """The gradient rows still in the ring: the last `window` completed steps."""
    return np.arange(max(0, num_steps - window), num_steps)


def site_kept_steps(num_steps: int, window: int) -> np.ndarray:
    """The site rows still in the ring: the last `window` steps, the one in progress included."""
    return np.arange(max(0, num_steps - window + 1), num_steps + 1)


class GradRing:
    """Per step: per-parameter norms [n], NaN counts [n], Inf counts [n], then the total norm, the
    clip coefficient and the skipped flag, in one float64 row (counts stay exact); and each
    parameter's first step with NaN/Inf, over the whole run."""

    def __init__(self, n: int, window: int, device: torch.device) -> None:
        f64 = {"dtype": torch.float64, "device": device}
        self.n, self.window, self.device = n, window, device
        self.blank = torch.cat(
            [
                torch.full((n,), math.nan, **f64),
                torch.zeros(2 * n, **f64),
                torch.tensor([math.nan, 1.0, math.nan], **f64),
            ]
        )
        self.ring = self.blank.repeat(window, 1)
        # The rows as views made once: indexing a tensor from Python costs microseconds.
        self.rows = list(self.ring.unbind(0))
        self.first = torch.full((n,), NEVER, dtype=torch.int64, device=device)
        self.constants = {
            "nan": torch.full((1,), math.nan, **f64),
            "one": torch.ones(1, **f64),
            "zero": torch.zeros(1, **f64),
        }

    def row(self, step: int) -> Tensor:
        return self.rows[step % self.window]

    def fold(self, step: int) -> None:
        """Moves each parameter's first step with NaN/Inf from the ring into the latch, before the
        ring overwrites its rows; row r then holds step (step - window + r)."""
        n = self.n
        bad = (self.ring[:, n : 2 * n] + self.ring[:, 2 * n : 3 * n]) > 0
        fold(self.first, bad, step - self.window)

    def buffers(self) -> list[Tensor]:
        return [self.ring, self.first]


class SiteRing:
    """Watched inputs and module outputs ("sites"), per step: NaN and Inf counts, largest finite
    |x| (float32: the fused op's norm dtype for all but float64 inputs), and the position among the
    step's hook calls of the first call in which each site held NaN/Inf (NEVER: none), which names
    the first site to produce them. Every buffer has `window` rows however many forwards run
    between two steps; columns appear as the forward runs and grow by doubling."""

    def __init__(self, window: int, device: torch.device, columns: int) -> None:
        self.window, self.device = window, device
        self.counts = torch.zeros((window, 2, columns), dtype=torch.int64, device=device)
        self.max_abs = torch.full((window, columns), -math.inf, dtype=torch.float32, device=device)
        self.first_call = torch.full((window, columns), NEVER, dtype=torch.int64, device=device)
        self.first = torch.full((columns,), NEVER, dtype=torch.int64, device=device)
        self._views()

    def _views(self) -> None:
        self.count_rows = list(self.counts.unbind(0))
        self.max_rows = list(self.max_abs.unbind(0))
        self.call_rows = list(self.first_call.unbind(0))

    def grow(self, needed: int) -> None:
        have = self.first.numel()
        if needed <= have:
            return
        size = max(needed, 2 * have)
        self.counts = grow_columns(self.counts, size, 0)
        self.max_abs = grow_columns(self.max_abs, size, -math.inf)
        self.first_call = grow_columns(self.first_call, size, NEVER)
        self.first = grow_columns(self.first, size, NEVER)
        self._views()

    def record(self, step: int, call: int, columns: Tensor, norms: Tensor, counts: Tensor) -> None:
        """Adds one hook call's statistics (per tensor: norms [k], counts [3, k + 1]) to the row of
        `step`; call: the call's position among this step's calls."""
        slot = step % self.window
        self.count_rows[slot].index_add_(1, columns, counts[NAN_ROW : INF_ROW + 1, :-1])
        if norms.dtype != torch.float32:
            norms = norms.to(torch.float32)
        self.max_rows[slot].scatter_reduce_(0, columns, norms, "amax")
        seen = torch.where(counts[NONFINITE_ROW, :-1] > 0, call, NEVER)
        self.call_rows[slot].scatter_reduce_(0, columns, seen, "amin")

    def start(self, step: int) -> None:
        """Clears the row of a new step (folding the latch first when the ring wraps)."""
        slot = step % self.window
        if slot == 0:
            fold(self.first, self.counts.sum(1) > 0, step - self.window)
        self.count_rows[slot].zero_()
        self.max_rows[slot].fill_(-math.inf)
        self.call_rows[slot].fill_(NEVER)

    def buffers(self) -> list[Tensor]:
        return [self.counts, self.max_abs, self.first_call, self.first]


def forward_order(first_call: np.ndarray) -> np.ndarray:
    """Per row, each site's rank among the distinct first calls that saw NaN/Inf (0: the first
    call to see any; sites seen in the same call share a rank), -1 for sites that saw none."""
    order = np.full(first_call.shape, -1, dtype=np.int64)
    for i, row in enumerate(first_call):
        seen = row < NEVER
        if seen.any():
            order[i, seen] = np.searchsorted(np.unique(row[seen]), row[seen])
    return order


class FeatureRing:
    """Per-feature statistics of one model input (the feature_stats op's rows, ops.FEATURE_ROWS),
    per step: float64 [window, 7, F], several forwards of a step combined with one add and one
    maximum; and each feature's first step with NaN and with Inf, over the whole run."""

    def __init__(
        self, window: int, device: torch.device, features: int, dim: int, ndim: int
    ) -> None:
        self.window, self.device, self.features = window, device, features
        self.dim, self.ndim = dim, ndim
        additive = ops.FEATURE_ADDITIVE_ROWS
        self.blank = torch.zeros((len(ops.FEATURE_ROWS), features), dtype=torch.float64)
        self.blank[additive:] = -math.inf
        self.blank = self.blank.to(device)
        self.ring = self.blank.repeat(window, 1, 1)
        self.rows = list(self.ring.unbind(0))
        self.sums = [row[:additive] for row in self.rows]
        self.extremes = [row[additive:] for row in self.rows]
        self.first = torch.full((2, features), NEVER, dtype=torch.int64, device=device)

    def record(self, step: int, stats: Tensor) -> None:
        slot = step % self.window
        self.sums[slot].add_(stats[: ops.FEATURE_ADDITIVE_ROWS])
        extremes = self.extremes[slot]
        torch.maximum(extremes, stats[ops.FEATURE_EXTREME_ROWS], out=extremes)

    def start(self, step: int) -> None:
        """Clears the row of a new step (folding the latches first when the ring wraps)."""
        slot = step % self.window
        if slot == 0:
            fold(self.first, self.ring[:, ops.FEATURE_NONFINITE_ROWS] > 0, step - self.window)
        self.rows[slot].copy_(self.blank)

    def buffers(self) -> list[Tensor]:
        return [self.ring, self.first]


class IndexCache:
    """Index tensors on the device, made once per key (a host-to-device copy each) and dropped all
    at once past _INDEX_CACHE_SIZE keys, so that a list that changes every step cannot grow it."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cache: dict[tuple, Tensor] = {}

    def get(self, key: tuple) -> Tensor | None:
        return self.cache.get(key)

    def make(self, key: tuple, values: list[int]) -> Tensor:
        if len(self.cache) >= _INDEX_CACHE_SIZE:
            self.cache.clear()
        with normal_tensors():
            index = torch.tensor(values, dtype=torch.long, device=self.device)
        self.cache[key] = index
        return index

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.cache.values())


def grad_placement(
    params: list[Tensor], column: dict[int, int], n: int, cache: IndexCache
) -> tuple[Tensor, Tensor | None, list[Tensor]]:
    """Where a step's values for `params` go in a gradient row (n parameters known), which of them
    to keep (None: all), and, the first time this list is seen, the parameters that are not known
    (say a learnable loss weight held by the optimizer), whose statistics are left out."""
    key = ("grad", *map(id, params))
    known = [(i, column[id(p)]) for i, p in enumerate(params) if id(p) in column]
    strangers = [p for p in params if id(p) not in column]
    positions = cache.get(key)
    fresh = positions is None
    if fresh:
        columns = [c for _, c in known]
        tail = [3 * n + j for j in range(GRAD_SCALARS)]
        layout = columns + [n + c for c in columns] + [2 * n + c for c in columns] + tail
        positions = cache.make(key, layout)
    keep = None
    if strangers:
        k = len(params)
        rows = [i for i, _ in known]
        slots = rows + [k + i for i in rows] + [2 * k + i for i in rows]
        keep_key = ("keep", *key)
        keep = cache.get(keep_key)
        if keep is None:
            keep = cache.make(keep_key, slots + [3 * k + j for j in range(GRAD_SCALARS)])
    return positions, keep, strangers if fresh else []
