"""The host-overhead scenario: what a call costs the host per tensor, with compute negligible.

Gradients of 1 float32 value each (parameters with gradients), 100, 2,000 and 10,000 of them,
clipped by torch.nn.utils.clip_grad_norm_ (its default foreach on a CPU, foreach=True on a GPU),
by gradstats.clip_grad_norm_ (plain) and by GradPlan.clip_grad_norm_ (planned), with nothing to
clip and with clipping. The caches stay warm (two copies of the set, no sweep): this measures the
host's work, not memory. Each row gives microseconds per call and nanoseconds per tensor for each
side, torch's time over each of the other two, and whether the planned call keeps within issue 16's
budget of PLANNED_BUDGET_BASE_US plus PLANNED_BUDGET_NS_PER_TENSOR per tensor.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from gradstats.bench.cases import (
    HOST_OVERHEAD,
    FlatSet,
    GradPool,
    check_clip_sides,
    clip_sides,
    max_norm_of,
    reference_norm,
)
from gradstats.bench.presets import uniform
from gradstats.bench.timing import Side, Timings

HOST_COUNTS = (100, 2_000, 10_000)
# --quick stops short of 10,000, where torch alone takes tens of milliseconds a call on a CPU.
QUICK_HOST_COUNTS = (100, 2_000)
HOST_VALUES_PER_TENSOR = 1
HOST_DTYPE = "float32"
# A planned call's host work (issue 16): at most this fixed cost plus this much per tensor.
PLANNED_BUDGET_BASE_US = 50.0
PLANNED_BUDGET_NS_PER_TENSOR = 30.0
# The target holds the planned call to its budget on this many tensors.
BUDGET_TARGET_TENSORS = 10_000
US_PER_MS = 1e3
NS_PER_US = 1e3
VARIANTS = ("clip-noop", "clip")  # nothing to clip, clipping: the clip scenarios' names
HOST_SIDES = ("torch", "gradstats", "planned")

METHOD = (
    f"Host overhead: N gradients of {HOST_VALUES_PER_TENSOR} {HOST_DTYPE} value each (parameters "
    "with gradients), caches warm (two copies of the set, no sweep), so that the time is host "
    "work; torch.nn.utils.clip_grad_norm_ against gradstats.clip_grad_norm_ (plain) and "
    "GradPlan.clip_grad_norm_ (planned), with nothing to clip and with clipping; medians, "
    "interleaved, garbage collector off; the planned call's budget is "
    f"{PLANNED_BUDGET_BASE_US:g} us + {PLANNED_BUDGET_NS_PER_TENSOR:g} ns per tensor (issue 16)."
)


def planned_budget_us(tensors: int) -> float:
    """The most host time a planned call over this many tensors may take, in microseconds."""
    return PLANNED_BUDGET_BASE_US + PLANNED_BUDGET_NS_PER_TENSOR * tensors / NS_PER_US


class HostSet:
    """tensors gradients of one value each, with their parameters and plans, in two copies."""

    def __init__(self, tensors: int, device: torch.device, generator: torch.Generator) -> None:
        self.preset = uniform(f"{tensors:,} x {HOST_VALUES_PER_TENSOR}", tensors, 1)
        layout = FlatSet(self.preset, getattr(torch, HOST_DTYPE), device)
        pristine = layout.random(generator)
        self.norm = reference_norm(layout.views(pristine))
        # No flush: the pool keeps its minimum of two copies and sweeps nothing through the cache.
        self.grads = GradPool(layout, pristine, flush_bytes=0, evict=lambda: None)


@dataclass
class HostCase:
    """One host-overhead row: the sides to time and what was checked before."""

    tensors: int
    variant: str
    sides: list[Side]
    norm_errors: dict[str, float]
    grads: GradPool


def host_case(host: HostSet, variant: str, foreach: bool | None) -> HostCase:
    clips = variant == "clip"
    sides = clip_sides(host.grads, max_norm_of(host.norm, clips), clips, foreach)
    errors = check_clip_sides(HOST_OVERHEAD, host.grads, sides, clips, host.norm)
    plain, planned, theirs = sides
    return HostCase(host.preset.num_tensors, variant, [theirs, plain, planned], errors, host.grads)


def host_row(case: HostCase, t: Timings, device: torch.device) -> dict[str, Any]:
    """The row of a timed host-overhead case (see benchmarks/README.md for the fields)."""
    n = case.tensors
    row: dict[str, Any] = {
        "preset": f"{n:,} x {HOST_VALUES_PER_TENSOR}",
        "preset_description": f"{n:,} tensors of {HOST_VALUES_PER_TENSOR} value",
        "tensors": n,
        "elements": n * HOST_VALUES_PER_TENSOR,
        "dtype": HOST_DTYPE,
        "scenario": HOST_OVERHEAD,
        "variant": case.variant,
        "device": device.type,
    }
    for side in HOST_SIDES:
        us = t.median(side) * US_PER_MS
        row[f"{side}_us"] = us
        row[f"{side}_ns_per_tensor"] = us * NS_PER_US / n
        row[f"{side}_iqr_us"] = t.iqr(side) * US_PER_MS
        row[f"{side}_min_us"] = min(t.times[side]) * US_PER_MS
    row["speedup"] = row["torch_us"] / row["gradstats_us"]
    row["planned_speedup"] = row["torch_us"] / row["planned_us"]
    row["paired_speedup"] = t.paired_ratio("torch", "gradstats")
    row["planned_paired_speedup"] = t.paired_ratio("torch", "planned")
    row["budget_us"] = planned_budget_us(n)
    row["within_budget"] = row["planned_us"] <= row["budget_us"]
    row["planned_builds"] = case.grads.builds()
    row["repeats"] = len(t.times["planned"])
    for side, error in case.norm_errors.items():
        row[f"{side}_norm_error"] = error
    return row
