"""Timing for the benchmark: one clock per device, sides measured interleaved, host syncs counted.

Every side of a comparison (gradstats, torch, the bandwidth floor, ...) is timed in the same loop,
one call each per repeat, in an order that rotates from repeat to repeat, so that a noisy
neighbour or a clock change hits every side alike. Each call takes the next slot of its pool of
identical inputs, so that the inputs of consecutive calls are far apart in memory and every call
reads from memory rather than from the cache; anything a call changes is restored untimed.
"""

from __future__ import annotations

import gc
import math
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

MS_PER_S = 1e3
QUARTILES = 4


@dataclass
class Pool:
    """Slots of identical inputs, handed out round robin.

    evict, when set, runs untimed after each call: for inputs too small to fill the cache with a
    reasonable number of copies, it sweeps a scratch buffer through the cache instead.
    """

    size: int
    evict: Callable[[], object] | None = None
    cursor: int = 0

    def next(self) -> int:
        slot = self.cursor
        self.cursor = (self.cursor + 1) % self.size
        return slot


@dataclass
class Side:
    """One contender: run(slot) is timed; restore(slot), when given, runs untimed after it."""

    name: str
    run: Callable[[int], object]
    pool: Pool
    restore: Callable[[int], None] | None = None

    def call(self, timer: Timer) -> float:
        slot = self.pool.next()
        elapsed = timer(lambda: self.run(slot))
        if self.restore is not None:
            self.restore(slot)
        if self.pool.evict is not None:
            self.pool.evict()
        return elapsed


class Timer:
    """Milliseconds of one call: CUDA events on a GPU (queue drained first), a host clock on a CPU.

    With the queue empty when the start event is recorded, the events span the host's launch work
    too, so a call that is slow to launch is not flattered.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        if device.type == "cuda":
            self.start = torch.cuda.Event(enable_timing=True)
            self.end = torch.cuda.Event(enable_timing=True)

    def __call__(self, fn: Callable[[], object]) -> float:
        if self.device.type != "cuda":
            begin = time.perf_counter()
            fn()
            return (time.perf_counter() - begin) * MS_PER_S
        torch.cuda.synchronize(self.device)
        self.start.record()
        fn()
        self.end.record()
        self.end.synchronize()
        return self.start.elapsed_time(self.end)


@dataclass
class Timings:
    """Per-side call times in ms, repeat by repeat (the same index is the same repeat)."""

    times: dict[str, list[float]] = field(default_factory=dict)

    def median(self, name: str) -> float:
        return statistics.median(self.times[name])

    def iqr(self, name: str) -> float:
        values = self.times[name]
        if len(values) < QUARTILES:
            return max(values) - min(values)
        q = statistics.quantiles(values, n=QUARTILES)
        return q[-1] - q[0]

    def paired_ratio(self, numerator: str, denominator: str) -> float:
        """Median over repeats of numerator / denominator, each pair timed next to each other."""
        pairs = zip(self.times[numerator], self.times[denominator])
        return statistics.median(a / b for a, b in pairs if b > 0)


def measure(
    sides: list[Side],
    timer: Timer,
    warmup: int,
    repeats: int | None,
    budget_s: float,
    min_repeats: int,
    max_repeats: int,
) -> Timings:
    """Warm-up rounds (at least one call on each slot), then interleaved timed rounds.
    repeats=None fits the rounds into budget_s.

    The garbage collector is off while timing (as in timeit), so that a collection triggered by one
    side's allocations does not land in the other side's time.
    """
    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        return _measure(sides, timer, warmup, repeats, budget_s, min_repeats, max_repeats)
    finally:
        if was_enabled:
            gc.enable()


def _measure(sides, timer, warmup, repeats, budget_s, min_repeats, max_repeats) -> Timings:
    round_s = math.inf
    # Every slot is called before timing: a slot's first call pays one-time costs (an optimizer's
    # state, a GradPlan's build) that a training loop pays once, not every step.
    for _ in range(max(warmup, *(side.pool.size for side in sides))):
        begin = time.perf_counter()
        for side in sides:
            side.call(timer)
        round_s = time.perf_counter() - begin
    if repeats is None:
        fitted = budget_s / round_s if round_s > 0 else max_repeats
        repeats = max(min_repeats, min(max_repeats, math.ceil(fitted)))
    timings = Timings({side.name: [] for side in sides})
    for r in range(repeats):
        shift = r % len(sides)
        for side in sides[shift:] + sides[:shift]:
            timings.times[side.name].append(side.call(timer))
    return timings


SYNC_WARNING = "synchroniz"


def count_syncs(side: Side) -> int:
    """Host synchronisations during one call, as torch's CUDA sync debug mode reports them.

    The debug mode flags the synchronising calls that go through c10::cuda (stream and device
    synchronisation, blocking copies to the host such as .item() and .cpu()); a raw CUDA runtime
    call in native code would escape it.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        previous = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode("warn")
        try:
            slot = side.pool.next()
            side.run(slot)
        finally:
            torch.cuda.set_sync_debug_mode(previous)
        if side.restore is not None:
            side.restore(slot)
    torch.cuda.synchronize()
    return sum(SYNC_WARNING in str(w.message).lower() for w in caught)
