"""The plot of GradMonitor.plot(): matplotlib is imported only when a plot is drawn."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from gradstats._core import CLIP_EPS
from gradstats._files import write_whole
from gradstats.monitor.history import Finding, MonitorHistory, MonitorThresholds
from gradstats.monitor.report import fmt

# Labels of the findings' step markers on the plot.
_SHORT = {
    "exploding_gradients": "exploding",
    "vanishing_gradients": "vanishing",
    "bad_input": "bad input",
    "nonfinite_gradients": "NaN grads",
    "nonfinite_activations": "NaN activations",
}
_PLOT_DPI = 120
_PLOT_WIDTH = 11.0
# Panel heights in inches: the heatmap grows with the parameters, up to _PLOT_MAX_LABELS rows.
_PLOT_PANEL = 2.0
_PLOT_MIN_PANEL = 1.5
_PLOT_ROW_INCHES = 0.16
# Heatmap rows get at most this many labels; more would overlap.
_PLOT_MAX_LABELS = 40
# Step markers (NaN/Inf, skipped) sit at these heights of their panel, in axes coordinates, and the
# log y axis is stretched by _PLOT_HEADROOM so that they do not cover the data.
_PLOT_MARK_HIGH = 0.93
_PLOT_MARK_LOW = 0.84
_PLOT_HEADROOM = 100.0


def save_plot(
    path: str | Path,
    h: MonitorHistory,
    findings: list[Finding],
    max_norm: float | None,
    th: MonitorThresholds,
    title: str | None,
) -> Path:
    """Draws the plot of h and writes it to path as a PNG (whole or not at all)."""
    try:
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ImportError(
            "GradMonitor.plot() needs matplotlib: pip install gradstats[plot] "
            "(or pip install matplotlib)"
        ) from exc
    fig = _draw(Figure, h, findings, max_norm, th, title)
    return write_whole(
        Path(path), lambda temporary: fig.savefig(temporary, dpi=_PLOT_DPI, bbox_inches="tight")
    )


def _draw(figure_cls: type, h: MonitorHistory, findings: list[Finding], max_norm, th, title):
    from matplotlib.ticker import NullFormatter

    n = len(h.names)
    inputs = [j for j, is_input in enumerate(h.site_is_input) if is_input]
    heat_height = max(_PLOT_MIN_PANEL, min(n, _PLOT_MAX_LABELS) * _PLOT_ROW_INCHES)
    heights = [heat_height, _PLOT_PANEL] + ([_PLOT_PANEL] if inputs else [])
    fig = figure_cls(figsize=(_PLOT_WIDTH, sum(heights) + 1.0), layout="constrained")
    grid = fig.add_gridspec(len(heights), 2, height_ratios=heights, width_ratios=[50, 1])
    heat = fig.add_subplot(grid[0, 0])
    panels = [fig.add_subplot(grid[k, 0], sharex=heat) for k in range(1, len(heights))]
    for k in range(1, len(heights)):
        fig.add_subplot(grid[k, 1]).axis("off")
    image = _draw_heatmap(heat, h)
    heat.set_title(
        title or "Per-parameter gradient norm (log10; black: exactly 0, red: NaN/Inf, grey: none)"
    )
    fig.colorbar(image, cax=fig.add_subplot(grid[0, 1]), extend="min").set_label("log10 norm")
    _draw_total(panels[0], h, max_norm)
    if inputs:
        _draw_inputs(panels[1], h, inputs, th)
    for axes in [heat, *panels[:-1]]:
        axes.tick_params(labelbottom=False)
    for axes in panels:
        axes.yaxis.set_minor_formatter(NullFormatter())
        axes.grid(True, which="major", alpha=0.3)
        axes.legend(loc="upper left", fontsize=7)
        _mark_findings(axes, findings, labelled=axes is panels[0])
    panels[-1].set_xlabel("step")
    return fig


def _draw_heatmap(axes, h: MonitorHistory):
    from matplotlib import colormaps
    from matplotlib.colors import ListedColormap

    n, steps = len(h.names), h.steps
    norms = h.grad_norms.T
    nonfinite = (h.grad_nan + h.grad_inf).T > 0
    positive = np.isfinite(norms) & (norms > 0)
    logs = np.log10(np.where(positive, norms, 1.0))
    lo, hi = (
        (float(logs[positive].min()), float(logs[positive].max())) if positive.any() else (0, 1)
    )
    if hi <= lo:
        lo, hi = lo - 1, hi + 1
    # Exactly-zero gradients sit below the colour range and show in the colormap's "under" colour.
    data = np.ma.masked_array(np.where(norms == 0, lo - 1, logs), mask=~(positive | (norms == 0)))
    cmap = colormaps["viridis"].with_extremes(under="black", bad="lightgrey")
    extent = (steps[0] - 0.5, steps[-1] + 0.5, n - 0.5, -0.5)
    style = {"aspect": "auto", "interpolation": "nearest", "extent": extent}
    image = axes.imshow(data, cmap=cmap, vmin=lo, vmax=hi, **style)
    red = np.ma.masked_array(np.ones_like(logs), mask=~nonfinite)
    axes.imshow(red, cmap=ListedColormap(["red"]), **style)
    every = max(1, math.ceil(n / _PLOT_MAX_LABELS))
    axes.set_yticks(range(0, n, every), [h.names[i] for i in range(0, n, every)])
    axes.tick_params(axis="y", labelsize=7)
    return image


def _draw_total(axes, h: MonitorHistory, max_norm: float | None) -> None:
    steps, total = h.steps, h.total_norm
    ok = np.isfinite(total) & (total > 0)
    axes.semilogy(steps[ok], total[ok], marker=".", linewidth=1, label="total norm")
    clipped = ok & (h.clip_coef < 1)
    threshold = max_norm
    if threshold is None and clipped.any():
        threshold = float(np.median(h.clip_coef[clipped] * (total[clipped] + CLIP_EPS)))
    if threshold is not None:
        axes.axhline(threshold, color="orange", linestyle="--", label=f"clip at {fmt(threshold)}")
    if clipped.any():
        axes.plot(steps[clipped], total[clipped], "o", mfc="none", color="orange", label="clipped")
    bad = ~np.isfinite(total) | ((h.grad_nan + h.grad_inf).sum(axis=1) > 0)
    _mark_steps(axes, steps[bad], _PLOT_MARK_HIGH, "x", "red", "NaN/Inf gradients")
    _mark_steps(axes, steps[h.skipped == 1], _PLOT_MARK_LOW, "v", "purple", "skipped")
    _headroom(axes)
    axes.set_ylabel(f"total grad norm (L{fmt(h.norm_type)})")


def _draw_inputs(axes, h: MonitorHistory, inputs: list[int], th: MonitorThresholds) -> None:
    steps = h.site_steps
    for j in inputs:
        seen = np.isfinite(h.site_max_abs[:, j]) & (h.site_max_abs[:, j] > 0)
        axes.semilogy(
            steps[seen], h.site_max_abs[seen, j], marker=".", linewidth=1, label=h.sites[j]
        )
    axes.axhline(th.input_abs_limit, color="orange", linestyle="--", label="extreme-input limit")
    bad = (h.site_nan[:, inputs] + h.site_inf[:, inputs]).sum(axis=1) > 0
    _mark_steps(axes, steps[bad], _PLOT_MARK_HIGH, "x", "red", "NaN/Inf inputs")
    _headroom(axes)
    axes.set_ylabel("input: largest |x|")


def _mark_steps(axes, steps: np.ndarray, height: float, marker: str, color: str, label: str):
    """Markers at a fixed height of the axes (in axes coordinates), above the data."""
    if steps.size:
        heights = np.full(steps.size, height)
        transform = axes.get_xaxis_transform()
        axes.plot(steps, heights, marker, color=color, transform=transform, label=label)


def _headroom(axes) -> None:
    """Room above the data for the markers: the top of a log axis raised by a few decades."""
    low, high = axes.get_ylim()
    axes.set_ylim(low, high * _PLOT_HEADROOM)


def _mark_findings(axes, findings: list[Finding], labelled: bool) -> None:
    by_step: dict[int, list[str]] = {}
    for f in findings:
        by_step.setdefault(f.step, []).append(_SHORT[f.cause])
    transform = axes.get_xaxis_transform()
    for step, causes in by_step.items():
        axes.axvline(step, color="grey", linestyle=":", linewidth=1)
        if not labelled:
            continue
        axes.text(
            step,
            0.02,
            " " + ", ".join(causes),
            transform=transform,
            rotation=90,
            fontsize=7,
            va="bottom",
            color="dimgrey",
        )
