"""`python -m gradstats bench`: gradstats against torch.nn.utils, side by side, on real gradients.

Each row times gradstats and torch on the same random gradients (a preset's real parameter shapes,
one dtype, one scenario), interleaved in one process, next to the machine's bandwidth floor measured
in the same loop; gradstats.GradPlan is timed next to the plain calls. The host-overhead scenario
times the host's work alone, on 1-element gradients. See gradstats.bench.cases and
gradstats.bench.host for the scenarios and gradstats.bench.timing for the method.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from gradstats.bench import env
from gradstats.bench.cases import SCENARIOS, BenchError
from gradstats.bench.dist import DIST_FILES, DIST_RANKS, DIST_SCENARIO, run_dist
from gradstats.bench.dist import markdown as dist_markdown
from gradstats.bench.host import HOST_COUNTS, QUICK_HOST_COUNTS
from gradstats.bench.plot import PlotUnavailable, plot
from gradstats.bench.presets import LLAMA_LAYERS, PRESET_NAMES
from gradstats.bench.report import (
    BUSY_OTHER_SHARE,
    KEEP_BUSY,
    Row,
    markdown,
    read_json,
    write_atomically,
)
from gradstats.bench.runner import BUSY_RETRIES, DTYPES, ROW_BUDGET_S, Config, Runner

DESCRIPTION = __doc__
DEFAULT_PRESETS = {
    "cpu": ("gpt2-small", "many-small", "many-tiny"),
    "cuda": PRESET_NAMES,
}
QUICK_PRESETS = ("many-tiny",)
# Llama-3.2-1B is 1.2G values (5 GB in float32, several copies of it needed): 2 of its 16 layers
# by default on a CPU, the whole model on a GPU.
CPU_LLAMA_LAYERS = 2
WARMUP = 2
QUICK_WARMUP = 1
QUICK_REPEATS = 3

EXIT_ERROR = 1
EXIT_NO_PLOT = 3
# Where a run writes its results when neither --out nor --json/--plot says where: a folder of its
# own under the current one, named by device and UTC time, and the names of the files in it.
DEFAULT_OUT_ROOT = Path("gradstats-bench")
OUT_STAMP = "%Y%m%d-%H%M%S"
RESULT_FILES = {"json": "results.json", "markdown": "results.md", "plot": "results.png"}


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
        "--scenario",
        nargs="+",
        metavar="NAME",
        help=f"{', '.join(SCENARIOS)} or all (default all); or {DIST_SCENARIO}: DDP and FSDP2 on "
        "--ranks processes the bench launches (gradstats.bench.dist; not part of all)",
    )
    parser.add_argument(
        "--ranks",
        type=int,
        default=DIST_RANKS,
        help=f"processes of the {DIST_SCENARIO} scenario (default {DIST_RANKS}; one GPU each on "
        "cuda)",
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
    parser.add_argument(
        "--out",
        type=Path,
        metavar="DIR",
        help=f"write {', '.join(RESULT_FILES.values())} (the plot needs matplotlib) into DIR"
        f" (default, when neither --json nor --plot is given: {DEFAULT_OUT_ROOT}/DEVICE-TIME)",
    )
    parser.add_argument("--json", type=Path, metavar="PATH", help="write header and rows as JSON")
    parser.add_argument("--plot", type=Path, metavar="PATH", help="write a PNG (needs matplotlib)")
    parser.add_argument(
        "--from-json",
        type=Path,
        metavar="PATH",
        help="run nothing: print the markdown of a saved --json file (and --plot it)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    parser.add_argument(
        "--busy-share",
        type=float,
        default=BUSY_OTHER_SHARE,
        metavar="SHARE",
        help="a row during which other processes used more than this share of the CPUs is timed"
        f" again, up to {BUSY_RETRIES} times, then marked busy and left out of the table (default"
        f" {BUSY_OTHER_SHARE:g}; {KEEP_BUSY} keeps every row)",
    )


def pick_device(requested: str | None) -> torch.device:
    """The device a --device asks for (cpu, cuda, cuda:N; None: cuda when usable, else cpu),
    checked: a device that cannot run gradstats stops the program with what is wrong and what to
    do (SystemExit), rather than an error deep inside torch. The examples check theirs with it."""
    if requested is None:
        usable = torch.cuda.is_available() and env.has_cuda_kernels()
        return torch.device("cuda", torch.cuda.current_device()) if usable else torch.device("cpu")
    try:
        device = torch.device(requested)
    except RuntimeError:
        raise SystemExit(f"--device {requested}: not a device; use cpu, cuda or cuda:N") from None
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise SystemExit(f"--device {requested}: gradstats has kernels for cpu and cuda only")
    if not torch.cuda.is_available():
        build = "" if torch.version.cuda else f" (torch {torch.__version__} is a CPU build)"
        raise SystemExit(
            f"--device {requested}: no CUDA device is visible to torch{build}; use --device cpu"
        )
    count = torch.cuda.device_count()
    index = torch.cuda.current_device() if device.index is None else device.index
    if index >= count:
        raise SystemExit(
            f"--device {requested}: torch sees {count} CUDA device(s), cuda:0 to cuda:{count - 1}"
        )
    if not env.has_cuda_kernels():
        raise SystemExit(
            f"--device {requested}: this gradstats build has no CUDA kernels (see python -m "
            "gradstats info); rebuild with a CUDA toolkit and a CUDA build of torch"
        )
    return torch.device("cuda", index)


@dataclasses.dataclass(frozen=True)
class Outputs:
    """The files a run writes (None: not written); plot_asked: --plot named the plot, so a missing
    matplotlib is an error rather than a note."""

    json: Path | None = None
    markdown: Path | None = None
    plot: Path | None = None
    plot_asked: bool = False

    def folder(self) -> Path | None:
        """The folder of the results, when they share one."""
        parents = {path.parent for path in (self.json, self.markdown, self.plot) if path}
        return parents.pop() if len(parents) == 1 else None


def outputs(args: argparse.Namespace, device: torch.device) -> Outputs:
    """--json and --plot name their files; --out (or, when none of the three is given, a new
    folder under DEFAULT_OUT_ROOT) holds the others."""
    folder = args.out
    if folder is None and args.json is None and args.plot is None:
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime(OUT_STAMP)
        folder = DEFAULT_OUT_ROOT / f"{device.type}-{stamp}"
    named = {kind: folder / name if folder else None for kind, name in RESULT_FILES.items()}
    return Outputs(
        json=args.json or named["json"],
        markdown=named["markdown"],
        plot=args.plot or named["plot"],
        plot_asked=args.plot is not None,
    )


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
        busy_share=args.busy_share,
        host_counts=QUICK_HOST_COUNTS if args.quick else HOST_COUNTS,
    )


def report(header: dict[str, Any], rows: list[Row], out: Outputs) -> int:
    """Prints the markdown and writes it, writes the plot, then says which files were written."""
    text = markdown(header, rows)
    print(text)
    written = [] if out.json is None else [f"results: {out.json}"]
    if out.markdown is not None:
        write_atomically(out.markdown, text + "\n")
        written.append(f"markdown: {out.markdown}")
    status = 0
    if out.plot is not None:
        try:
            plot(out.plot, header, rows)
            written.append(f"plot: {out.plot}")
        except PlotUnavailable as err:
            print(f"gradstats bench: {err}", file=sys.stderr)
            status = EXIT_NO_PLOT if out.plot_asked else 0
    if written:
        print("\nwrote " + "; ".join(written))
    return status


def run_dist_scenario(args: argparse.Namespace) -> int:
    """The dist scenario: its own ranks, its own table (and dist.json / dist.md in the folder)."""
    device = pick_device(args.device)
    out = outputs(args, device)
    try:
        rows = run_dist(device.type, args.ranks)
    except RuntimeError as err:
        print(f"gradstats bench: {err}", file=sys.stderr)
        return EXIT_ERROR
    machine = env.machine_info(device)
    where = machine.get("gpu") or f"{machine['cpu']}, {machine['cpu_cores']} cores"
    text = dist_markdown(rows, f"{device.type}: {where}", args.ranks)
    print(text)
    folder = out.folder()
    if folder is not None:
        payload = {
            "machine": machine,
            "versions": env.versions(),
            "rows": [asdict(r) for r in rows],
        }
        write_atomically(folder / DIST_FILES["json"], json.dumps(payload, indent=1) + "\n")
        write_atomically(folder / DIST_FILES["markdown"], text + "\n")
        print(f"\nwrote {folder / DIST_FILES['json']}; {folder / DIST_FILES['markdown']}")
    return 0


def run(args: argparse.Namespace) -> int:
    """Runs the benchmark the parsed arguments ask for (or reports a saved run); the exit status."""
    names = _split(args.scenario)
    if DIST_SCENARIO in names:
        status = run_dist_scenario(args)
        rest = [n for n in names if n != DIST_SCENARIO]
        if not rest or status != 0:
            return status
        args = argparse.Namespace(**{**vars(args), "scenario": rest})
    if args.from_json is not None:
        header, rows = read_json(args.from_json)
        return report(header, rows, Outputs(plot=args.plot, plot_asked=True))
    config = make_config(args)
    out = outputs(args, config.device)
    config = dataclasses.replace(config, json_path=out.json)
    if out.folder() is not None:
        print(f"gradstats bench: results go to {out.folder()}", file=sys.stderr)
    runner = Runner(config)
    try:
        runner.run()
    except BenchError as err:
        saved = config.json_path is not None and runner.rows
        kept = f" (the rows before it are in {config.json_path})" if saved else ""
        print(f"gradstats bench: {err}{kept}", file=sys.stderr)
        return EXIT_ERROR
    runner.save()
    return report(runner.header(), runner.rows, out)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m gradstats bench",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(parser)
    return run(parser.parse_args(argv))
