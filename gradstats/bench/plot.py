"""The benchmark's plot (--plot): speedup over torch and fraction of the bandwidth floor.

Busy rows are left out, as from the table, and so are the host-overhead rows (no bandwidth). The
legend sits under the panels, outside them, so that it never covers a bar, and each y axis reaches
past its largest bar and that bar's label.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gradstats.bench.cases import BANDWIDTH_SCENARIOS, SCENARIO_TITLES
from gradstats.bench.report import PERCENT, Header, Row, is_host, machine_line, published

PLOT_WIDTH_PER_GROUP_IN = 0.9
PLOT_MIN_WIDTH_IN = 8.0
PLOT_HEIGHT_IN = 7.5
PLOT_DPI = 120
BAR_GROUP_WIDTH = 0.8
BAR_LABEL_FONT = 6
REFERENCE_LINE_WIDTH = 0.8
# Room above the tallest bar for its label: a factor on the log speedup axis, a share of the
# linear one. The log axis also goes this factor below its smallest bar (or below 1x).
LOG_HEADROOM = 1.5
LINEAR_HEADROOM = 0.12


class PlotUnavailable(RuntimeError):
    """matplotlib is not installed."""


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise PlotUnavailable(
            "--plot needs matplotlib, which is not installed: pip install matplotlib"
        ) from err
    return plt


def _group(row: Row) -> str:
    return f"{row['preset']}\n{row['dtype']}"


def speedup_limits(speedups: list[float]) -> tuple[float, float]:
    """The log axis: from below the smallest bar (and 1x) to above the largest bar's label."""
    low = min([*speedups, 1.0]) / LOG_HEADROOM
    high = max([*speedups, 1.0]) * LOG_HEADROOM
    return low, high


def fraction_limits(percents: list[float]) -> tuple[float, float]:
    """The linear axis: from 0 to above the largest bar's label (and above the 100% line)."""
    return 0.0, max([*percents, float(PERCENT)]) * (1 + LINEAR_HEADROOM)


def figure(header: Header, rows: list[Row]) -> Any:
    """The matplotlib figure, with its two panels (top: speedup, bottom: % of the floor)."""
    plt = _pyplot()
    from matplotlib.ticker import FuncFormatter

    rows, busy = published(header, rows)
    rows = [row for row in rows if not is_host(row)]
    busy = [row for row in busy if not is_host(row)]
    groups = list(dict.fromkeys(_group(row) for row in rows))
    scenarios = [s for s in BANDWIDTH_SCENARIOS if any(row["scenario"] == s for row in rows)]
    width = BAR_GROUP_WIDTH / max(len(scenarios), 1)
    size = (max(PLOT_MIN_WIDTH_IN, PLOT_WIDTH_PER_GROUP_IN * len(groups)), PLOT_HEIGHT_IN)
    fig, (top, bottom) = plt.subplots(2, 1, figsize=size, sharex=True, layout="constrained")
    for i, scenario in enumerate(scenarios):
        by_group = {_group(row): row for row in rows if row["scenario"] == scenario}
        xs = [g + (i - (len(scenarios) - 1) / 2) * width for g in range(len(groups))]
        present = [(x, by_group[name]) for x, name in zip(xs, groups) if name in by_group]
        label = SCENARIO_TITLES.get(scenario, scenario)
        xs_present = [x for x, _ in present]
        bars = top.bar(xs_present, [r["speedup"] for _, r in present], width, label=label)
        top.bar_label(bars, fmt="%.1f", fontsize=BAR_LABEL_FONT)
        fractions = [r["floor_fraction"] * PERCENT for _, r in present]
        bars = bottom.bar(xs_present, fractions, width, label=label)
        bottom.bar_label(bars, fmt="%.0f", fontsize=BAR_LABEL_FONT)
    top.axhline(1.0, color="black", linewidth=REFERENCE_LINE_WIDTH)
    top.set_yscale("log")
    top.set_ylim(*speedup_limits([row["speedup"] for row in rows]))
    times = FuncFormatter(lambda value, _: f"{value:g}x")
    top.yaxis.set_major_formatter(times)
    top.yaxis.set_minor_formatter(times)
    top.set_ylabel("speedup over torch (x, log)")
    bottom.axhline(PERCENT, color="black", linewidth=REFERENCE_LINE_WIDTH)
    bottom.set_ylim(*fraction_limits([row["floor_fraction"] * PERCENT for row in rows]))
    bottom.set_ylabel("% of bandwidth floor")
    bottom.set_xticks(range(len(groups)))
    bottom.set_xticklabels(groups, fontsize="small")
    if scenarios:
        # Under the panels, where constrained layout keeps room for it (both panels share it).
        handles, labels = top.get_legend_handles_labels()
        fig.legend(handles, labels, loc="outside lower center", ncols=len(labels), fontsize="small")
    title = f"gradstats bench on {header.get('device', '?')}: {machine_line(header)}"
    if busy:
        rows_left = f"{len(busy)} busy row{'' if len(busy) == 1 else 's'}"
        title += f"\n{rows_left} left out (see the table)"
    fig.suptitle(title, fontsize="small")
    return fig


def plot(path: Path, header: Header, rows: list[Row]) -> None:
    """Writes the figure as a PNG."""
    fig = figure(header, rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=PLOT_DPI)
    _pyplot().close(fig)
