"""`python -m gradstats bench`: gradstats against torch.nn.utils, side by side, on real gradients.

Each row times gradstats and torch on the same random gradients (a preset's real parameter shapes,
one dtype, one scenario), interleaved in one process, next to the machine's bandwidth floor measured
in the same loop. See bench_cases for the scenarios and bench_timing for the method.
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import gradstats
from gradstats import bench_env
from gradstats.bench_cases import (
    ADAMW_TENSORS_PER_GRAD,
    MAX_SLOTS,
    OURS_RTOL,
    SCENARIOS,
    BenchError,
    Case,
    Context,
    FlatSet,
    GradPool,
    adamw_case,
    apex_l2norm,
    clip_case,
    floor_side,
    slot_count,
    stats_case,
)
from gradstats.bench_presets import LLAMA_LAYERS, PRESET_NAMES, make_preset
from gradstats.bench_report import (
    PlotUnavailable,
    Row,
    markdown,
    plot,
    read_json,
    write_json,
)
from gradstats.bench_timing import Timer, Timings, count_syncs, measure

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_PRESETS = {
    "cpu": ("gpt2-small", "many-small", "many-tiny"),
    "cuda": PRESET_NAMES,
}
QUICK_PRESETS = ("many-tiny",)
# Llama-3.2-1B is 1.2G values (5 GB in float32, several copies of it needed): 2 of its 16 layers
# by default on a CPU, the whole model on a GPU.
CPU_LLAMA_LAYERS = 2

WARMUP = 2
MIN_REPEATS = 7
MAX_REPEATS = 200
ROW_BUDGET_S = 0.8  # timed seconds per row when --repeats is not given
QUICK_WARMUP = 1
QUICK_REPEATS = 3
# Rotating inputs span at least this many last-level caches, and the floor's buffer at least
# FLOOR_CACHES of them (so it measures memory, not cache, even for the smallest gradient sets).
FLUSH_CACHES = 2
FLOOR_CACHES = 4
QUICK_FLOOR_BYTES = 4 << 20
# Leave this share of the free memory unused.
MEMORY_HEADROOM = 0.8
# A row during which other processes used more than this share of the CPUs is flagged.
BUSY_OTHER_SHARE = 0.05
BYTES_PER_MS_IN_GBPS = 1e-6
FLOAT32_BYTES = 4
PERCENT = 100
# A baseline whose norm is further than this from the float64 norm gets a note under the table.
BASELINE_NOTE_ERROR = 1e-2
BASELINES = ("torch", "apex")  # bytes per millisecond to GB/s (1 GB = 1e9 bytes)

EXIT_ERROR = 1
EXIT_NO_PLOT = 3


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


def _split(values: Sequence[str] | None) -> list[str]:
    return [v for value in values or () for v in value.split(",") if v]


def _choose(given: Sequence[str] | None, allowed: Sequence[str], default: Sequence[str], what: str):
    names = _split(given) or list(default)
    if "all" in names:
        return list(allowed)
    unknown = [n for n in names if n not in allowed]
    if unknown:
        raise SystemExit(f"unknown {what} {', '.join(unknown)}; choose from {', '.join(allowed)}")
    return list(dict.fromkeys(names))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when usable")
    parser.add_argument(
        "--preset",
        nargs="+",
        metavar="NAME",
        help=f"{', '.join(PRESET_NAMES)} or all (default: cpu {', '.join(DEFAULT_PRESETS['cpu'])};"
        " cuda all)",
    )
    parser.add_argument(
        "--dtype", nargs="+", metavar="DTYPE", help=f"{', '.join(DTYPES)} or all (default all)"
    )
    parser.add_argument(
        "--scenario", nargs="+", metavar="NAME", help=f"{', '.join(SCENARIOS)} or all (default all)"
    )
    parser.add_argument(
        "--repeats",
        type=int,
        help=f"timed calls per side (default: fitted to about {ROW_BUDGET_S:g} s per row)",
    )
    parser.add_argument("--warmup", type=int, help=f"untimed calls per side (default {WARMUP})")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads for both sides")
    parser.add_argument(
        "--llama-layers",
        type=int,
        help=f"layers of llama-1b (default: {CPU_LLAMA_LAYERS} on cpu, {LLAMA_LAYERS} on cuda)",
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny inputs, 3 repeats")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, metavar="PATH", help="write header and rows as JSON")
    parser.add_argument("--plot", type=Path, metavar="PATH", help="write a PNG (needs matplotlib)")
    parser.add_argument(
        "--from-json",
        type=Path,
        metavar="PATH",
        help="run nothing: print the markdown of a saved --json file (and --plot it)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")


def pick_device(requested: str | None) -> torch.device:
    has_cuda_kernels = "CUDA" in gradstats.kernel_devices()["stats"]
    if requested == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA device is visible to torch")
        if not has_cuda_kernels:
            raise SystemExit(
                "--device cuda: this gradstats build has no CUDA kernels (see python -m gradstats"
                " info); rebuild with a CUDA toolkit and a CUDA build of torch"
            )
        return torch.device("cuda", torch.cuda.current_device())
    if requested is None and torch.cuda.is_available() and has_cuda_kernels:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def make_config(args: argparse.Namespace) -> Config:
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    default_presets = QUICK_PRESETS if args.quick else DEFAULT_PRESETS[device.type]
    default_layers = LLAMA_LAYERS if device.type == "cuda" else CPU_LLAMA_LAYERS
    return Config(
        device=device,
        presets=_choose(args.preset, PRESET_NAMES, default_presets, "preset"),
        dtypes=_choose(args.dtype, list(DTYPES), list(DTYPES), "dtype"),
        scenarios=_choose(args.scenario, SCENARIOS, SCENARIOS, "scenario"),
        warmup=args.warmup if args.warmup is not None else QUICK_WARMUP if args.quick else WARMUP,
        repeats=args.repeats if args.repeats is not None else QUICK_REPEATS if args.quick else None,
        llama_layers=args.llama_layers or default_layers,
        quick=args.quick,
        seed=args.seed,
        progress=not args.no_progress,
        json_path=args.json,
    )


class Progress:
    """A tqdm bar on stderr when tqdm is installed, else one plain line per row."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.total, self.done, self.enabled = total, 0, enabled
        self.bar: Any = None
        if enabled:
            try:
                from tqdm import tqdm
            except ImportError:
                return
            self.bar = tqdm(total=total, file=sys.stderr, unit="row", leave=False)

    def start(self, label: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.set_description(label)
        else:
            end = "\r" if sys.stderr.isatty() else "\n"
            print(f"[{self.done + 1}/{self.total}] {label}".ljust(60), end=end, file=sys.stderr)

    def step(self) -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.enabled and sys.stderr.isatty():
            print(file=sys.stderr)


def free_memory(device: torch.device) -> int | None:
    if device.type == "cuda":
        torch.cuda.empty_cache()  # blocks cached by the allocator count as free
        return torch.cuda.mem_get_info(device)[0]
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def reference_norm(views: list[torch.Tensor]) -> float:
    """The L2 norm of the tensors, in float64, one tensor at a time (bounded scratch memory)."""
    total = sum(float(v.double().square().sum()) for v in views)
    return math.sqrt(total)


class Runner:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.device = config.device
        self.timer = Timer(self.device)
        self.generator = torch.Generator(self.device).manual_seed(config.seed)
        self.cache_bytes = bench_env.cache_bytes(self.device)
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
        self.repeats_used: set[int] = set()

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
            f"Median of {repeats} repeats after {c.warmup} warm-up calls, per side, interleaved "
            f"in one process ({timing}); inputs rotate over copies spanning >= {FLUSH_CACHES}x "
            f"the {self.cache_bytes >> 20} MiB last-level cache (or, for sets that would need more "
            f"than {MAX_SLOTS} copies, an untimed sweep of that size after each call); "
            f"garbage collector off while timing; floor: {floor} over max(gradients, "
            f"{self.floor_min_bytes >> 20} MiB), timed in the same loop; GB/s: bytes that must "
            "move (one read of the gradients for stats and for nothing to clip, three passes when"
            " clipping, plus the AdamW step's 4 reads and 3 writes) over the gradstats time."
        )
        if c.quick:
            summary += " QUICK smoke run: caches not flushed, numbers not meaningful."
        return {
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join(["python -m gradstats", *sys.argv[1:]]),
            "device": self.device.type,
            "machine": bench_env.machine_info(self.device),
            "versions": bench_env.versions(),
            "method": {
                "summary": summary,
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
            },
            "notes": self.notes + self.accuracy_notes() + self.load_notes(),
        }

    def accuracy_notes(self) -> list[str]:
        """One note per (preset, dtype, baseline) whose norm was far from the float64 norm."""
        worst: dict[tuple[str, str, str], float] = {}
        for row in self.rows:
            for side in BASELINES:
                error = row.get(f"{side}_norm_error")
                if error is not None and error > BASELINE_NOTE_ERROR:
                    key = (row["preset"], row["dtype"], side)
                    worst[key] = max(worst.get(key, 0.0), error)
        return [
            f"{preset} {dtype}: {side}'s norm is {error * PERCENT:.1f}% off the float64 norm "
            f"(gradstats' within {OURS_RTOL:g})"
            for (preset, dtype, side), error in worst.items()
        ]

    def load_notes(self) -> list[str]:
        """A warning naming the rows during which other processes used the CPUs."""
        busy = [row for row in self.rows if (row.get("other_cpu_share") or 0.0) > BUSY_OTHER_SHARE]
        if not busy:
            return []
        worst = max(row["other_cpu_share"] for row in busy)
        return [
            f"the machine was busy during {len(busy)} of {len(self.rows)} rows: other processes "
            f"used up to {worst * PERCENT:.0f}% of the {os.cpu_count()} CPUs (other_cpu_share in "
            "the JSON); multi-threaded timings suffer most, so rerun on an idle machine"
        ]

    def save(self) -> None:
        if self.config.json_path is not None:
            write_json(self.config.json_path, self.header(), self.rows)

    def scenarios(self) -> list[str]:
        scenarios = list(self.config.scenarios)
        if "adamw-step" in scenarios and not hasattr(gradstats, "ClipGradOptimizer"):
            scenarios.remove("adamw-step")
            self.notes.append(
                "adamw-step skipped: gradstats.ClipGradOptimizer is not in this version"
            )
        return scenarios

    def needed_bytes(self, layout: FlatSet, scenarios: list[str]) -> int:
        n = layout.nbytes
        floor = max(n, self.floor_min_bytes) * (2 if self.device.type == "cuda" else 1)
        grads = (1 + slot_count(n, self.flush_bytes)) * n
        need = grads
        if "adamw-step" in scenarios:
            per_slot = ADAMW_TENSORS_PER_GRAD * n
            slots = slot_count(2 * per_slot, self.flush_bytes, 1)
            need = max(need, n + 2 * slots * per_slot)
        return need + floor

    def run(self) -> list[Row]:
        c = self.config
        scenarios = self.scenarios()
        if c.device.type == "cpu" and "llama-1b" in c.presets and c.llama_layers != LLAMA_LAYERS:
            self.notes.append(
                f"llama-1b on CPU: {c.llama_layers} of its {LLAMA_LAYERS} layers (all its layer "
                f"shapes, fewer repeats of them); --llama-layers {LLAMA_LAYERS} for the whole model"
            )
        if self.device.type == "cuda" and self.apex is None:
            self.notes.append("apex not installed: no multi_tensor_l2norm baseline")
        progress = Progress(len(c.presets) * len(c.dtypes) * len(scenarios), c.progress)
        try:
            for name in c.presets:
                preset = make_preset(name, c.llama_layers)
                for dtype_name in c.dtypes:
                    self.run_set(preset, dtype_name, scenarios, progress)
        finally:
            progress.close()
        return self.rows

    def run_set(self, preset, dtype_name: str, scenarios: list[str], progress: Progress) -> None:
        dtype = DTYPES[dtype_name]
        layout = FlatSet(preset, dtype, self.device)
        need, free = self.needed_bytes(layout, scenarios), free_memory(self.device)
        if free is not None and need > MEMORY_HEADROOM * free:
            self.notes.append(
                f"{preset.name} {dtype_name} skipped: needs about {need / 1e9:.1f} GB, "
                f"{free / 1e9:.1f} GB free"
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
        only_adamw = scenarios == ["adamw-step"]
        grads = None if only_adamw else GradPool(layout, pristine, self.flush_bytes, self.evict)
        case = None
        for scenario in scenarios:
            progress.start(f"{preset.name} {dtype_name} {scenario}")
            case = None  # frees the last case's inputs before the next one takes memory
            if scenario == "adamw-step":
                grads = None
                case = adamw_case(ctx, self.generator)
            elif scenario == "stats":
                case = stats_case(ctx, grads)
            else:
                case = clip_case(ctx, grads, clips=scenario == "clip")
            self.rows.append(self.time_case(preset, dtype_name, case, floor_bytes))
            self.save()
            progress.step()

    def time_case(self, preset, dtype_name: str, case: Case, floor_bytes: int) -> Row:
        c = self.config
        others = bench_env.OtherLoad()
        others.start()
        timings = measure(
            case.sides, self.timer, c.warmup, c.repeats, ROW_BUDGET_S, MIN_REPEATS, MAX_REPEATS
        )
        share = others.share()
        repeats = len(timings.times["gradstats"])
        self.repeats_used.add(repeats)
        row = self.make_row(preset, dtype_name, case, timings, floor_bytes, repeats)
        row["other_cpu_share"] = share
        return row

    def make_row(self, preset, dtype_name, case: Case, t: Timings, floor_bytes, repeats) -> Row:
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
            "repeats": repeats,
        }
        for side, error in case.norm_errors.items():
            row[f"{side}_norm_error"] = error
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
            row["gradstats_syncs"] = count_syncs(by_name["gradstats"])
            row["torch_syncs"] = count_syncs(by_name["torch"])
        return row


def report(header: dict[str, Any], rows: list[Row], plot_path: Path | None) -> int:
    print(markdown(header, rows))
    if plot_path is None:
        return 0
    try:
        plot(plot_path, header, rows)
    except PlotUnavailable as err:
        print(f"gradstats bench: {err}", file=sys.stderr)
        return EXIT_NO_PLOT
    return 0


def run(args: argparse.Namespace) -> int:
    if args.from_json is not None:
        header, rows = read_json(args.from_json)
        return report(header, rows, args.plot)
    runner = Runner(make_config(args))
    try:
        runner.run()
    except BenchError as err:
        print(f"gradstats bench: {err}", file=sys.stderr)
        return EXIT_ERROR
    runner.save()
    return report(runner.header(), runner.rows, args.plot)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m gradstats bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(parser)
    return run(parser.parse_args(argv))
