"""The benchmark's main loop: one gradient set per (preset, dtype), one timed row per scenario.

Each row times gradstats and torch on the same random gradients, interleaved in one process, next to
the machine's bandwidth floor measured in the same loop (see gradstats.bench.timing). The
host-overhead rows (gradstats.bench.host) come first, once per run: they need no preset.
"""

from __future__ import annotations

import datetime
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from gradstats.bench import env, host
from gradstats.bench.cases import (
    HOST_OVERHEAD,
    MAX_SLOTS,
    Case,
    Context,
    FlatSet,
    GradPool,
    adamw_case,
    adamw_pair_bytes,
    apex_l2norm,
    clip_case,
    floor_side,
    reference_norm,
    slot_count,
    stats_case,
)
from gradstats.bench.presets import LLAMA_LAYERS, Preset, make_preset
from gradstats.bench.report import MIB, Progress, Row, accuracy_notes, is_busy, write_json
from gradstats.bench.timing import Side, Timer, Timings, count_syncs, measure

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MIN_REPEATS = 7
MAX_REPEATS = 200
ROW_BUDGET_S = 0.8  # timed seconds per row when --repeats is not given
# Rotating inputs span at least this many last-level caches, and the floor's buffer at least
# FLOOR_CACHES of them (so it measures memory, not cache, even for the smallest gradient sets).
FLUSH_CACHES = 2
FLOOR_CACHES = 4
QUICK_FLOOR_BYTES = 4 << 20
# Leave this share of the free memory unused.
MEMORY_HEADROOM = 0.8
BYTES_PER_MS_IN_GBPS = 1e-6  # bytes per millisecond to GB/s (1 GB = 1e9 bytes)
GB = 1e9
FLOAT32_BYTES = 4
# The floor on a GPU is a copy: its buffer is allocated twice (source and destination).
CUDA_FLOOR_BUFFERS = 2
# A row timed while other processes were busy is timed again up to this many times, after a pause
# that lets a short burst of other work pass; the least disturbed attempt is kept. A row still busy
# after them says that the machine is busy for longer than a burst: the rows after it are timed
# once until one is quiet (retrying each would triple a busy run's time for nothing).
BUSY_RETRIES = 2
BUSY_PAUSE_S = 1.0


@dataclass
class Config:
    device: torch.device
    presets: list[str]
    dtypes: list[str]
    scenarios: list[str]
    warmup: int
    repeats: int | None
    llama_layers: int
    quick: bool
    seed: int
    progress: bool
    json_path: Path | None
    busy_share: float  # other processes' share of the CPUs above which a row counts as busy
    host_counts: tuple[int, ...] = host.HOST_COUNTS  # gradient counts of the host-overhead rows

    @property
    def bandwidth_scenarios(self) -> list[str]:
        """The scenarios timed on each preset's gradients (all but host-overhead)."""
        return [s for s in self.scenarios if s != HOST_OVERHEAD]

    @property
    def host_rows(self) -> int:
        return len(self.host_counts) * len(host.VARIANTS) if HOST_OVERHEAD in self.scenarios else 0


class Runner:
    """Runs the configured rows, one (preset, dtype) gradient set at a time."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.device = config.device
        self.timer = Timer(self.device)
        self.generator = torch.Generator(self.device).manual_seed(config.seed)
        self.cache_bytes = env.cache_bytes(self.device)
        self.flush_bytes = 0 if config.quick else FLUSH_CACHES * self.cache_bytes
        self.floor_min_bytes = (
            QUICK_FLOOR_BYTES if config.quick else FLOOR_CACHES * self.cache_bytes
        )
        self.foreach = True if self.device.type == "cuda" else None
        scratch = torch.empty(max(1, self.flush_bytes // FLOAT32_BYTES), device=self.device)
        scratch.normal_(generator=self.generator)
        self.evict = scratch.sum
        self.apex = apex_l2norm(self.device)
        self.notes: list[str] = []
        self.rows: list[Row] = []
        self.repeats_used: set[int] = set()  # by the bandwidth rows (the host rows say their own)
        self.retrying = True  # False while the machine stays busy (BUSY_RETRIES)
        self.started = time.perf_counter()  # the run's wall time goes into the header
        self.timed_once = 0  # busy rows not timed again for that reason

    def header(self) -> dict[str, Any]:
        c = self.config
        floor = (
            "device-to-device copy (bytes read + written)"
            if self.device.type == "cuda"
            else "float32 tensor.sum() (bytes read)"
        )
        timing = "CUDA events" if self.device.type == "cuda" else "host clock"
        used = sorted(self.repeats_used) or [0]
        repeats = str(c.repeats) if c.repeats else f"{used[0]}-{used[-1]} (fitted to the row time)"
        summary = (
            f"Median of {repeats} repeats after {c.warmup} warm-up calls (and at least one on "
            "every copy, so that one-time costs stay out), per side, interleaved "
            f"in one process ({timing}); inputs rotate over copies spanning >= {FLUSH_CACHES}x "
            f"the {self.cache_bytes // MIB} MiB last-level cache (or, for sets that would need "
            f"more than {MAX_SLOTS} copies, an untimed sweep of that size after each call); "
            f"garbage collector off while timing; floor: {floor} over max(gradients, "
            f"{self.floor_min_bytes // MIB} MiB), timed in the same loop; GB/s: bytes that must "
            "move (one read of the gradients for stats and for nothing to clip, three passes when"
            " clipping, plus the AdamW step's 4 reads and 3 writes) over the gradstats time."
        )
        host_summary = host.METHOD
        if c.quick:
            summary += " QUICK smoke run: caches not flushed, numbers not meaningful."
            host_summary += " QUICK smoke run: numbers not meaningful."
        method: dict[str, Any] = {}
        if c.bandwidth_scenarios:
            method["summary"] = summary
        if c.host_rows:
            method["host_summary"] = host_summary
            method["host_counts"] = list(c.host_counts)
        return {
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join(["python -m gradstats", *sys.argv[1:]]),
            "device": self.device.type,
            "machine": env.machine_info(self.device),
            "versions": env.versions(),
            "method": {
                **method,
                "warmup": c.warmup,
                "repeats": c.repeats,
                "timer": timing,
                "floor": floor,
                "floor_min_bytes": self.floor_min_bytes,
                "cache_bytes": self.cache_bytes,
                "rotation_bytes": self.flush_bytes,
                "torch_foreach": self.foreach,
                "quick": c.quick,
                "llama_layers": c.llama_layers,
                "busy_share": c.busy_share,
                "busy_retries": BUSY_RETRIES,
            },
            "notes": self.notes + self.busy_notes() + accuracy_notes(self.rows),
            "wall_s": time.perf_counter() - self.started,
        }

    def busy_notes(self) -> list[str]:
        if not self.timed_once:
            return []
        return [
            f"{self.timed_once} busy row(s) were timed once, not {1 + BUSY_RETRIES} times: the "
            "machine had stayed busy through the retries of a row before them"
        ]

    def save(self) -> None:
        if self.config.json_path is not None:
            write_json(self.config.json_path, self.header(), self.rows)

    def needed_bytes(self, layout: FlatSet, scenarios: list[str]) -> int:
        n = layout.nbytes
        floor_buffers = CUDA_FLOOR_BUFFERS if self.device.type == "cuda" else 1
        floor = max(n, self.floor_min_bytes) * floor_buffers
        need = (1 + slot_count(n, self.flush_bytes)) * n
        if "adamw-step" in scenarios:
            pair_bytes = adamw_pair_bytes(n)
            need = max(need, n + slot_count(pair_bytes, self.flush_bytes, 1) * pair_bytes)
        return need + floor

    def run(self) -> list[Row]:
        c = self.config
        if c.device.type == "cpu" and "llama-1b" in c.presets and c.llama_layers != LLAMA_LAYERS:
            self.notes.append(
                f"llama-1b on CPU: {c.llama_layers} of its {LLAMA_LAYERS} layers (all its layer "
                f"shapes, fewer repeats of them); --llama-layers {LLAMA_LAYERS} for the whole model"
            )
        if self.device.type == "cuda" and self.apex is None:
            self.notes.append("apex not installed: no multi_tensor_l2norm baseline")
        scenarios = c.bandwidth_scenarios
        total = len(c.presets) * len(c.dtypes) * len(scenarios) + c.host_rows
        progress = Progress(total, c.progress)
        try:
            if c.host_rows:
                self.run_host(progress)
            for name in c.presets if scenarios else ():
                preset = make_preset(name, c.llama_layers)
                for dtype_name in c.dtypes:
                    self.run_set(preset, dtype_name, progress)
        finally:
            progress.close()
        return self.rows

    def run_host(self, progress: Progress) -> None:
        """The host-overhead rows: each gradient count, with nothing to clip and with clipping."""
        for tensors in self.config.host_counts:
            progress.start(f"{HOST_OVERHEAD} {tensors:,} tensors: preparing")
            tiny = host.HostSet(tensors, self.device, self.generator)
            for variant in host.VARIANTS:
                progress.start(f"{HOST_OVERHEAD} {tensors:,} tensors {variant}")
                started = time.perf_counter()
                case = host.host_case(tiny, variant, self.foreach)
                row = self.time_case(case.sides, lambda t, c=case: host.host_row(c, t, self.device))
                row["wall_s"] = time.perf_counter() - started
                self.rows.append(row)
                self.save()
                progress.step()

    def run_set(self, preset: Preset, dtype_name: str, progress: Progress) -> None:
        scenarios = self.config.bandwidth_scenarios
        dtype = DTYPES[dtype_name]
        layout = FlatSet(preset, dtype, self.device)
        need, free = self.needed_bytes(layout, scenarios), env.free_memory(self.device)
        if free is not None and need > MEMORY_HEADROOM * free:
            self.notes.append(
                f"{preset.name} {dtype_name} skipped: needs about {need / GB:.1f} GB, "
                f"{free / GB:.1f} GB free"
            )
            for _ in scenarios:
                progress.step()
            return
        progress.start(f"{preset.name} {dtype_name}: preparing")
        pristine = layout.random(self.generator)
        floor, floor_bytes = floor_side(
            self.device, max(layout.nbytes, self.floor_min_bytes), self.generator
        )
        ctx = Context(
            device=self.device,
            dtype=dtype,
            layout=layout,
            pristine=pristine,
            norm=reference_norm(layout.views(pristine)),
            flush_bytes=self.flush_bytes,
            evict=self.evict,
            foreach=self.foreach,
            floor=floor,
            apex=self.apex,
        )
        # The gradient pool and the AdamW slots never live at the same time (needed_bytes counts
        # the larger of the two): each is built when a scenario needs it, in any order.
        grads: GradPool | None = None
        for scenario in scenarios:
            progress.start(f"{preset.name} {dtype_name} {scenario}")
            started = time.perf_counter()
            case = None  # frees the last case's inputs before the next one takes memory
            if scenario == "adamw-step":
                grads = None
                case = adamw_case(ctx, self.generator)
            else:
                if grads is None:
                    grads = GradPool(layout, pristine, self.flush_bytes, self.evict)
                if scenario == "stats":
                    case = stats_case(ctx, grads)
                else:
                    case = clip_case(ctx, grads, clips=scenario == "clip")
            row = self.time_case(
                case.sides, lambda t, c=case: self.make_row(preset, dtype_name, c, t, floor_bytes)
            )
            row["wall_s"] = time.perf_counter() - started  # inputs built, checked and timed
            self.repeats_used.add(row["repeats"])
            self.rows.append(row)
            self.save()
            progress.step()

    def time_case(self, sides: list[Side], make_row: Callable[[Timings], Row]) -> Row:
        """Times the sides, again while other processes were busy (at most BUSY_RETRIES more
        times, none while the machine stays busy); make_row turns timings into a row; the least
        disturbed attempt is the row, marked busy when even it was."""
        best: Row | None = None
        retries = BUSY_RETRIES if self.retrying else 0
        for attempt in range(1 + retries):
            if attempt:
                time.sleep(BUSY_PAUSE_S)
            row = self.time_once(sides, make_row)
            if best is None or _other_share(row) < _other_share(best):
                best = row
            if not is_busy(best, self.config.busy_share):
                break
        best["attempts"] = attempt + 1
        best["busy"] = is_busy(best, self.config.busy_share)
        self.timed_once += best["busy"] and not retries
        self.retrying = not best["busy"]
        return best

    def time_once(self, sides: list[Side], make_row: Callable[[Timings], Row]) -> Row:
        c = self.config
        others = env.OtherLoad()
        others.start()
        timings = measure(
            sides, self.timer, c.warmup, c.repeats, ROW_BUDGET_S, MIN_REPEATS, MAX_REPEATS
        )
        share = others.share()
        row = make_row(timings)
        row["other_cpu_share"] = share
        return row

    def make_row(
        self, preset: Preset, dtype_name: str, case: Case, t: Timings, floor_bytes: int
    ) -> Row:
        ours, theirs, floor_ms = t.median("gradstats"), t.median("torch"), t.median("floor")
        floor_gbps = floor_bytes / floor_ms * BYTES_PER_MS_IN_GBPS
        gbps = case.bytes_moved / ours * BYTES_PER_MS_IN_GBPS
        row: Row = {
            "preset": preset.name,
            "preset_description": preset.description,
            "tensors": preset.num_tensors,
            "elements": preset.numel,
            "dtype": dtype_name,
            "scenario": case.scenario,
            "device": self.device.type,
            "gradstats_ms": ours,
            "torch_ms": theirs,
            "speedup": theirs / ours,
            "paired_speedup": t.paired_ratio("torch", "gradstats"),
            "gradstats_iqr_ms": t.iqr("gradstats"),
            "torch_iqr_ms": t.iqr("torch"),
            "gradstats_min_ms": min(t.times["gradstats"]),
            "torch_min_ms": min(t.times["torch"]),
            "bytes": case.bytes_moved,
            "gbps": gbps,
            "floor_ms": floor_ms,
            "floor_gbps": floor_gbps,
            "floor_fraction": gbps / floor_gbps,
            "repeats": len(t.times["gradstats"]),
        }
        for side, error in case.norm_errors.items():
            row[f"{side}_norm_error"] = error
        if "planned" in t.times:
            planned = t.median("planned")
            row["planned_ms"] = planned
            row["planned_speedup"] = theirs / planned
            row["planned_paired_speedup"] = t.paired_ratio("torch", "planned")
            row["planned_iqr_ms"] = t.iqr("planned")
            row["planned_min_ms"] = min(t.times["planned"])
        if "adamw" in t.times:
            adamw = t.median("adamw")
            read_ms = case.read_bytes / (floor_gbps / BYTES_PER_MS_IN_GBPS)
            row["adamw_ms"] = adamw
            row["overhead_reads"] = (ours - adamw) / read_ms
        if "apex" in t.times:
            row["apex_ms"] = t.median("apex")
            row["speedup_vs_apex"] = row["apex_ms"] / ours
        if self.device.type == "cuda":
            by_name = {side.name: side for side in case.sides}
            for side in ("gradstats", "planned", "torch"):
                if side in by_name:
                    row[f"{side}_syncs"] = count_syncs(by_name[side])
        return row


def _other_share(row: Row) -> float:
    """Other processes' share of the CPUs while the row was timed (0 where it is unknown)."""
    return row["other_cpu_share"] or 0.0
