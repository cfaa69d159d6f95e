"""Benchmark output: the JSON file, the markdown table (also from a saved JSON), the progress line.

JSON layout: {"schema": 1, "header": {...machine, versions, method, notes...}, "rows": [...]},
one row per (preset, dtype, scenario) with at least preset, dtype, scenario, device, gradstats_ms,
torch_ms, speedup, gbps and floor_fraction; and one row per (tensors, variant) of the host-overhead
scenario, with microseconds instead (torch_us, gradstats_us, planned_us, ...). The markdown gives
each kind its own table.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path
from typing import Any

from gradstats._files import write_whole
from gradstats.bench.cases import HOST_OVERHEAD, OURS_RTOL, SCENARIO_TITLES
from gradstats.bench.host import HOST_SIDES
from gradstats.bench.host import METHOD as HOST_METHOD

SCHEMA_VERSION = 1
MIB = 1 << 20
GIB = 1 << 30
PERCENT = 100
# A baseline whose norm is further than this from the float64 norm gets a note under the table.
BASELINE_NOTE_ERROR = 1e-2
BASELINES = ("torch", "apex")
# A row during which other processes used more than this share of the CPUs is timed again, and
# left out of the results if it stays that busy (the default of --busy-share).
BUSY_OTHER_SHARE = 0.05
# How a user keeps the busy rows (a share of 1: no row is ever too busy).
KEEP_BUSY = "--busy-share 1"
PROGRESS_LINE_WIDTH = 60
# A row can take minutes on a busy machine: a "still timing" line at least this often.
PROGRESS_TICK_S = 15.0
# What a cost measured below zero shows instead of a number, and the note that explains it.
NOISE = "noise (< 0)"
NOISE_NOTE = (
    f"{NOISE}: the wrapper measured faster than the bare AdamW step it contains, which is timing "
    "noise, not a negative cost."
)

Row = dict[str, Any]
Header = dict[str, Any]


class Progress:
    """A tqdm bar on stderr when tqdm is installed, else one plain line per row; and, while a row
    runs longer than tick_s, a "still timing" line every tick_s (from a thread that sleeps between
    lines, so that it does not disturb the timings)."""

    def __init__(self, total: int, enabled: bool, tick_s: float = PROGRESS_TICK_S) -> None:
        self.total, self.done, self.enabled, self.tick_s = total, 0, enabled, tick_s
        self.bar: Any = None
        self.label = ""
        self.started = self.last_line = time.monotonic()
        self.lock = threading.Lock()
        self.stopped = threading.Event()
        self.ticker: threading.Thread | None = None
        if not enabled:
            return
        try:
            from tqdm import tqdm
        except ImportError:
            pass
        else:
            self.bar = tqdm(total=total, file=sys.stderr, unit="row", leave=False)
        self.ticker = threading.Thread(target=self._tick, name="bench-progress", daemon=True)
        self.ticker.start()

    def _position(self) -> str:
        return f"[{self.done + 1}/{self.total}] {self.label}"

    def start(self, label: str) -> None:
        if not self.enabled:
            return
        with self.lock:
            self.label = label
            self.started = self.last_line = time.monotonic()
            if self.bar is not None:
                self.bar.set_description(label)
            else:
                end = "\r" if sys.stderr.isatty() else "\n"
                print(self._position().ljust(PROGRESS_LINE_WIDTH), end=end, file=sys.stderr)

    def _tick(self) -> None:
        while True:
            with self.lock:
                wait = self.last_line + self.tick_s - time.monotonic()
                if wait <= 0:
                    seconds = time.monotonic() - self.started
                    line = f"{self._position()}: still timing ({seconds:.0f} s)"
                    if self.bar is not None:
                        self.bar.write(line, file=sys.stderr)
                    else:
                        print(line, file=sys.stderr)
                    self.last_line = time.monotonic()
                    wait = self.tick_s
            if self.stopped.wait(wait):
                return

    def step(self) -> None:
        with self.lock:
            self.done += 1
            if self.bar is not None:
                self.bar.update(1)

    def close(self) -> None:
        self.stopped.set()
        if self.ticker is not None:
            self.ticker.join()
        if self.bar is not None:
            self.bar.close()
        elif self.enabled and sys.stderr.isatty():
            print(file=sys.stderr)


def accuracy_notes(rows: list[Row]) -> list[str]:
    """One note per (preset, dtype, baseline) whose norm was far from the float64 norm."""
    worst: dict[tuple[str, str, str], float] = {}
    for row in rows:
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


def is_host(row: Row) -> bool:
    """Whether the row is a host-overhead row (microseconds, no bandwidth)."""
    return row["scenario"] == HOST_OVERHEAD


def row_label(row: Row) -> str:
    """preset, dtype and scenario in words (and, for host rows, whether the call clipped)."""
    title = SCENARIO_TITLES.get(row["scenario"], row["scenario"])
    variant = row.get("variant")
    if variant:
        title += f" ({SCENARIO_TITLES.get(variant, variant)})"
    return f"{row['preset']} {row['dtype']} {title}"


def busy_share(header: Header) -> float:
    """The share of the CPUs other processes could use before a row counted as busy."""
    return header.get("method", {}).get("busy_share", BUSY_OTHER_SHARE)


def is_busy(row: Row, share: float = BUSY_OTHER_SHARE) -> bool:
    """Whether the row was measured while other processes used the machine: its numbers are then
    noise, not a result. Rows from before the flag existed are judged by their other_cpu_share."""
    if "busy" in row:
        return bool(row["busy"])
    return (row.get("other_cpu_share") or 0.0) > share


def published(header: Header, rows: list[Row]) -> tuple[list[Row], list[Row]]:
    """The rows that are results, and the busy ones left out."""
    share = busy_share(header)
    busy = [row for row in rows if is_busy(row, share)]
    return [row for row in rows if not is_busy(row, share)], busy


def busy_line(header: Header, busy: list[Row]) -> str:
    """Which rows were left out of the results, and why."""
    method = header.get("method", {})
    retries = method.get("busy_retries")
    tries = (
        f" (each timed up to {1 + retries} times, once while the machine stayed busy)"
        if retries
        else ""
    )
    names = ", ".join(
        f"{row_label(row)} ({(row.get('other_cpu_share') or 0.0) * PERCENT:.0f}%)" for row in busy
    )
    cpus = header.get("machine", {}).get("cpu_threads")
    of_cpus = f"the {cpus} CPUs" if cpus else "the CPUs"
    count = f"{len(busy)} row{'' if len(busy) == 1 else 's'}"
    return (
        f"Left out: {count} measured while other processes used more than "
        f"{busy_share(header) * PERCENT:.0f}% of {of_cpus}{tries} (their timings are noise, not "
        f"results; rerun them on an idle machine, or keep them with {KEEP_BUSY}): {names}"
    )


def write_atomically(path: Path, text: str) -> None:
    """Writes text to path whole (gradstats._files.write_whole): a reader, or a run stopped
    halfway, sees the old file or the new one, never a part."""
    write_whole(path, lambda temporary: temporary.write_text(text))


def write_json(path: Path, header: Header, rows: list[Row]) -> None:
    payload = {"schema": SCHEMA_VERSION, "header": header, "rows": rows}
    write_atomically(path, json.dumps(payload, indent=1) + "\n")


def read_json(path: Path) -> tuple[Header, list[Row]]:
    payload = json.loads(path.read_text())
    if isinstance(payload, list):  # a bare list of rows
        return {}, payload
    return payload.get("header", {}), payload["rows"]


def machine_line(header: Header) -> str:
    m = header.get("machine", {})
    if not m:
        return "machine: unknown"
    cpu = (
        f"{m.get('cpu')}, {m.get('cpu_cores')} cores / {m.get('cpu_threads')} threads "
        f"(torch uses {m.get('torch_threads')}), {m.get('cpu_cache_bytes', 0) // MIB} MiB LLC"
    )
    if m.get("memory_bytes"):
        cpu += f", {m['memory_bytes'] / GIB:.0f} GiB RAM"
    if "gpu" in m:
        driver = m.get("driver") or "unknown"
        gpu = f"{m['gpu']} (driver {driver}, CC {m.get('compute_capability')})"
        return f"GPU: {gpu}; CPU: {cpu}"
    return f"CPU: {cpu}"


def versions_line(header: Header) -> str:
    v = header.get("versions", {})
    if not v:
        return ""
    build = f"built for torch {v.get('built_for_torch')}, CPU ISA {v.get('cpu_isa')}, " + (
        f"CUDA kernels for CUDA {v.get('built_for_cuda')}" if v.get("cuda_kernels") else "no CUDA"
    )
    return (
        f"gradstats {v.get('gradstats')} ({build}); torch {v.get('torch')} "
        f"(CUDA {v.get('torch_cuda') or 'none'}); Python {v.get('python')}"
    )


def _fmt_ms(value: float) -> str:
    return f"{value:.3f}" if value < 1 else f"{value:.2f}" if value < PERCENT else f"{value:.0f}"


def _fmt_us(value: float) -> str:
    return f"{value:.1f}" if value < PERCENT else f"{value:.0f}"


def _fmt_speedup(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}x"


def _cost(reads: float) -> str:
    """A cost in reads of the gradients; below zero it is timing noise, never a number."""
    return NOISE if reads < 0 else f"{reads:.2f}"


def _has(rows: list[Row], key: str) -> bool:
    return any(row.get(key) is not None for row in rows)


def table(rows: list[Row]) -> str:
    """The markdown table of the rows (columns for syncs, AdamW and apex only where measured)."""
    syncs = _has(rows, "gradstats_syncs")
    planned = _has(rows, "planned_ms")
    adamw = _has(rows, "adamw_ms")
    apex = _has(rows, "apex_ms")
    head = ["preset", "dtype", "scenario", "gradstats ms", "torch ms", "speedup"]
    if planned:
        head += ["planned ms", "planned speedup"]
    head += ["GB/s", "of floor"]
    if syncs:
        head.append("syncs (ours/torch)")
    if adamw:
        head += ["AdamW alone ms", "wrapper cost (reads)"]
    if apex:
        head += ["apex ms", "vs apex"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [
            row["preset"],
            row["dtype"],
            SCENARIO_TITLES.get(row["scenario"], row["scenario"]),
            _fmt_ms(row["gradstats_ms"]),
            _fmt_ms(row["torch_ms"]),
            f"{row['speedup']:.2f}x",
        ]
        if planned:
            has = row.get("planned_ms") is not None
            cells += [
                _fmt_ms(row["planned_ms"]) if has else "",
                _fmt_speedup(row.get("planned_speedup")),
            ]
        cells += [f"{row['gbps']:.1f}", f"{row['floor_fraction'] * PERCENT:.0f}%"]
        if syncs:
            cells.append(f"{row.get('gradstats_syncs', '-')}/{row.get('torch_syncs', '-')}")
        if adamw:
            has = row.get("adamw_ms") is not None
            cells += [
                _fmt_ms(row["adamw_ms"]) if has else "",
                _cost(row["overhead_reads"]) if has else "",
            ]
        if apex:
            has = row.get("apex_ms") is not None
            cells += [
                _fmt_ms(row["apex_ms"]) if has else "",
                f"{row['speedup_vs_apex']:.2f}x" if has else "",
            ]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def host_table(rows: list[Row]) -> str:
    """The markdown table of the host-overhead rows: microseconds per call and nanoseconds per
    tensor for each side, torch's time over gradstats' (plain, planned), the planned budget."""
    head = [
        "tensors", "case", *(f"{side} us" for side in HOST_SIDES),
        *(f"{side} ns/tensor" for side in HOST_SIDES),
        "speedup", "planned speedup", "planned budget us", "within budget",
    ]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [
            f"{row['tensors']:,}",
            SCENARIO_TITLES.get(row["variant"], row["variant"]),
            *(_fmt_us(row[f"{side}_us"]) for side in HOST_SIDES),
            *(f"{row[f'{side}_ns_per_tensor']:.0f}" for side in HOST_SIDES),
            _fmt_speedup(row["speedup"]),
            _fmt_speedup(row["planned_speedup"]),
            f"{row['budget_us']:.0f}",
            "yes" if row["within_budget"] else "**no**",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _all_busy(header: Header, rows: list[Row], host: bool) -> str:
    """What stands in for a table none of whose rows was kept."""
    measured = sum(is_host(row) == host for row in rows)
    return (
        f"*No row of this table was kept: all {measured} were measured while other processes used"
        f' more than {busy_share(header) * PERCENT:.0f}% of the CPUs (see "Left out" below);'
        f" rerun on an idle machine, or keep them with {KEEP_BUSY}.*"
    )


def markdown(header: Header, rows: list[Row]) -> str:
    """Header lines (machine, versions, method), the table, the host-overhead table, then the
    notes."""
    device = header.get("device", rows[0]["device"] if rows else "?")
    date = f" ({header['date']})" if "date" in header else ""
    lines = [f"**gradstats bench on {device}**{date}: {machine_line(header)}"]
    versions = versions_line(header)
    if versions:
        lines += ["", f"Versions: {versions}"]
    method = header.get("method", {})
    summary = method.get("summary")
    if summary:
        lines += ["", f"Method: {summary}"]
    results, busy = published(header, rows)
    bandwidth = [row for row in results if not is_host(row)]
    hosts = [row for row in results if is_host(row)]
    # A kind of row the run measured gets its table, or, when every row of it was busy, a line
    # that says so in its place; a kind it did not measure gets none.
    if not rows or not all(map(is_host, rows)):
        lines += ["", table(bandwidth) if bandwidth or not rows else _all_busy(header, rows, False)]
    if any(map(is_host, rows)):
        host = host_table(hosts) if hosts else _all_busy(header, rows, True)
        lines += ["", method.get("host_summary", HOST_METHOD), "", host]
    if busy:
        lines += ["", busy_line(header, busy)]
    if any((row.get("overhead_reads") or 0.0) < 0 for row in bandwidth):
        lines += ["", NOISE_NOTE]
    notes = header.get("notes", [])
    if notes:
        lines.append("")
        lines += [f"- {note}" for note in notes]
    return "\n".join(lines)
