"""Checks a `python -m gradstats bench --json` file against the project's speed targets.

    PYTHONPATH=. python benchmarks/targets.py benchmarks/results/cpu.json [--strict]

Prints one line per target: the rows it covers, the worst of them, and whether it holds. The CPU
targets are issue 2's and 7's (on GPT-2-small gradients and the many-tensor lists) and issue 16's
(the host overhead of a planned call, ClipGradOptimizer's step against torch's), the GPU targets
issue 7's. With --strict the exit status is 1 when a target with rows misses.

Rows the benchmark marked busy (timed while other processes used the machine) are no evidence
either way: they are left out, and listed under the table. So is a cost measured below zero
(timing noise).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gradstats.bench.host import (
    BUDGET_TARGET_TENSORS,
    PLANNED_BUDGET_BASE_US,
    PLANNED_BUDGET_NS_PER_TENSOR,
    planned_budget_us,
)
from gradstats.bench.report import NOISE, busy_line, is_host, published, read_json

Row = dict[str, Any]
PERCENT = 100
BIG_GPU_BYTES = 2e9  # the GPU bandwidth target is about >= 2 GB of gradients
MANY_TENSOR_PRESETS = ("many-small", "many-tiny")
HOST_BUDGET_US = planned_budget_us(BUDGET_TARGET_TENSORS)
BIG_PRESETS = ("gpt2-small", "llama-1b")


@dataclass(frozen=True)
class Target:
    name: str
    device: str
    covers: Callable[[Row], bool]
    value: Callable[[Row], float]
    threshold: float
    at_most: bool = False  # the value must stay at or below the threshold
    unit: str = "x"
    cost: bool = False  # a cost cannot be negative: a value below zero is timing noise

    def is_noise(self, value: float) -> bool:
        return self.cost and value < 0

    def holds(self, value: float) -> bool:
        return value <= self.threshold if self.at_most else value >= self.threshold

    def show(self, value: float) -> str:
        if self.is_noise(value):
            return NOISE
        if self.unit == "%":
            return f"{value * PERCENT:.0f}%"
        return f"{value:.2f}{self.unit}"


def _is(preset: str | tuple[str, ...], scenario: str | tuple[str, ...], *dtypes: str):
    presets = (preset,) if isinstance(preset, str) else preset
    scenarios = (scenario,) if isinstance(scenario, str) else scenario
    return lambda row: (
        row["preset"] in presets
        and row["scenario"] in scenarios
        and (not dtypes or row["dtype"] in dtypes)
    )


def _speedup(row: Row) -> float:
    return row["speedup"]


def _floor(row: Row) -> float:
    return row["floor_fraction"]


def _ours_syncs(row: Row) -> int:
    """Host syncs of gradstats' calls: the plain one, and the planned one where it was timed."""
    return max(row["gradstats_syncs"], row.get("planned_syncs", 0))


def _planned_host(row: Row) -> bool:
    return is_host(row) and row["tensors"] == BUDGET_TARGET_TENSORS


CLIPS = ("clip-noop", "clip")
TARGETS = (
    Target("stats >= 1.5x get_total_norm (float32, bfloat16)", "cpu",
           _is("gpt2-small", "stats", "float32", "bfloat16"), _speedup, 1.5),
    Target("stats >= 4x get_total_norm (float16)", "cpu",
           _is("gpt2-small", "stats", "float16"), _speedup, 4.0),
    Target("stats >= 85% of the same-run sum() bandwidth", "cpu",
           _is("gpt2-small", "stats"), _floor, 0.85, unit="%"),
    Target("clip, nothing to clip >= 2.5x clip_grad_norm_", "cpu",
           _is("gpt2-small", "clip-noop"), _speedup, 2.5),
    Target("clip that clips >= 1.2x clip_grad_norm_", "cpu",
           _is("gpt2-small", "clip"), _speedup, 1.2),
    Target("many tensors: clip_grad_norm_ >= 10x", "cpu",
           _is(MANY_TENSOR_PRESETS, CLIPS), _speedup, 10.0),
    Target("many tensors, planned (issue 16): GradPlan.clip_grad_norm_ >= 10x", "cpu",
           lambda r: _is(MANY_TENSOR_PRESETS, CLIPS)(r) and "planned_speedup" in r,
           lambda r: r["planned_speedup"], 10.0),
    Target("ClipGradOptimizer step >= 1.0x clip_grad_norm_ + fused AdamW (every preset, dtype)",
           "cpu", lambda r: r["scenario"] == "adamw-step", _speedup, 1.0),
    Target(f"planned clip_grad_norm_ host time <= {HOST_BUDGET_US:.0f} us on "
           f"{BUDGET_TARGET_TENSORS:,} tensors ({PLANNED_BUDGET_BASE_US:g} us + "
           f"{PLANNED_BUDGET_NS_PER_TENSOR:g} ns per tensor)", "cpu",
           _planned_host, lambda r: r["planned_us"], HOST_BUDGET_US, at_most=True, unit=" us"),
    Target("stats >= 90% of the same-run copy bandwidth (>= 2 GB bfloat16)", "cuda",
           lambda r: _is(BIG_PRESETS, "stats", "bfloat16")(r) and r["bytes"] >= BIG_GPU_BYTES,
           _floor, 0.90, unit="%"),
    Target("clip, nothing to clip >= 2.5x torch foreach", "cuda",
           _is(BIG_PRESETS, "clip-noop"), _speedup, 2.5),
    Target("clip that clips >= 1.1x torch foreach", "cuda",
           _is(BIG_PRESETS, "clip"), _speedup, 1.1),
    Target("1,000 x 4,096 tensors >= 4x (wall clock)", "cuda",
           _is("many-medium", ("stats", *CLIPS)), _speedup, 4.0),
    Target("ClipGradOptimizer costs <= 1.1 gradient reads over bare fused AdamW", "cuda",
           _is(BIG_PRESETS, "adamw-step"), lambda r: r["overhead_reads"], 1.1,
           at_most=True, unit=" reads", cost=True),
    Target("zero host syncs per call (plain and planned)", "cuda",
           lambda r: "gradstats_syncs" in r, _ours_syncs, 0, at_most=True, unit=" syncs"),
)  # fmt: skip


def evaluate(rows: list[Row]) -> list[tuple[Target, list[Row], float | None, bool | None]]:
    """Per target: its rows, the worst value among them and whether it holds (None: no rows, or
    only noise)."""
    results = []
    devices = {row["device"] for row in rows}
    for target in TARGETS:
        if target.device not in devices:
            continue
        covered = [row for row in rows if row["device"] == target.device and target.covers(row)]
        if not covered:
            results.append((target, covered, None, None))
            continue
        values = [v for v in map(target.value, covered) if not target.is_noise(v)]
        if not values:
            results.append((target, covered, None, None))
            continue
        worst = max(values) if target.at_most else min(values)
        results.append((target, covered, worst, target.holds(worst)))
    return results


def _kind(row: Row) -> str:
    """What tells a target's rows on one preset and dtype apart: the scenario, or for host rows
    whether the call clipped."""
    return row.get("variant") or row["scenario"]


def render(results) -> str:
    lines = ["| target | rows | worst | each row | holds |", "|---|---|---|---|---|"]
    for target, covered, worst, holds in results:
        if not covered:
            lines.append(f"| {target.name} | 0 | - | not measured | - |")
            continue
        kinds = {_kind(r) for r in covered}
        each = ", ".join(
            f"{row['preset']} {row['dtype']}"
            + (f" {_kind(row)}" if len(kinds) > 1 else "")
            + f" {target.show(target.value(row))}"
            for row in covered
        )
        verdict = "-" if holds is None else "yes" if holds else "**no**"
        shown = "-" if worst is None else target.show(worst)
        cells = [target.name, str(len(covered)), shown, each, verdict]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, help="a JSON file written by bench --json")
    parser.add_argument("--strict", action="store_true", help="exit 1 when a target misses")
    args = parser.parse_args(argv)
    header, rows = read_json(args.results)
    rows, busy = published(header, rows)
    results = evaluate(rows)
    print(render(results))
    if busy:
        print(f"\n{busy_line(header, busy)}")
    missed = any(holds is False for _, _, _, holds in results)
    return 1 if args.strict and missed else 0


if __name__ == "__main__":
    sys.exit(main())
