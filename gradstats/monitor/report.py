"""The text of GradMonitor.report(), and the short number and name formats every message uses."""

from __future__ import annotations

import math
import textwrap
from collections.abc import Sequence

import numpy as np

from gradstats.monitor.history import Finding, MonitorHistory

TITLES = {
    "exploding_gradients": "Exploding gradients",
    "vanishing_gradients": "Vanishing gradients",
    "bad_input": "Bad input data",
    "nonfinite_gradients": "NaN/Inf gradients",
    "nonfinite_activations": "NaN/Inf activations",
}
# A message names at most this many tensors, a report's headline fewer; .where keeps them all.
NAMED_AT_MOST = 5
_TITLE_NAMES = 3
_WIDTH = 100
# Numbers this large are written whole (2090, not 2.09e+03).
_WHOLE_FROM = 1000
_INDENT = "   "
_BULLET = "     "


def fmt(x: float) -> str:
    """4.4e16, 0.031, 2.5: short numbers for messages."""
    if not math.isfinite(x):
        return str(x)
    if x != 0 and not 1e-3 <= abs(x) < 1e4:
        mantissa, exponent = f"{x:.1e}".split("e")
        return f"{mantissa}e{int(exponent)}"
    if abs(x) >= _WHOLE_FROM:
        return f"{x:.0f}"
    return f"{x:.3g}"


def listed(names: Sequence[str], at_most: int = NAMED_AT_MOST) -> str:
    shown = ", ".join(names[:at_most])
    more = len(names) - at_most
    return f"{shown} and {more} more" if more > 0 else shown


def fmt_int(x: float) -> str:
    return f"{int(x):,}" if math.isfinite(x) else "?"


def site_label(h: MonitorHistory, j: int) -> str:
    kind = h.site_types[j]
    return f"module {h.sites[j]} ({kind})" if kind else h.sites[j]


def format_report(h: MonitorHistory, findings: list[Finding]) -> str:
    """The text of GradMonitor.report()."""
    if h.steps.size:
        head = (
            f"GradMonitor: {h.steps.size} steps kept (steps {int(h.steps[0])}-"
            f"{int(h.steps[-1])}), {len(h.names)} parameters, {len(h.sites)} watched "
            f"inputs/outputs; {_norms(h)}."
        )
    else:
        head = f"GradMonitor: no step recorded yet; {len(h.sites)} watched inputs/outputs."
    lines = [head]
    if not findings:
        lines.append(
            "No problem found: no NaN/Inf in gradients or watched tensors, no exploding or "
            "vanishing gradients, no bad input data (missing values, unscaled features, outliers)."
        )
    else:
        lines.append(f"{len(findings)} finding(s), oldest first:")
    for i, f in enumerate(findings, 1):
        lines.append("")
        where = listed(f.where, _TITLE_NAMES)
        if f.cause == "nonfinite_activations":
            where = f"module {where}"
        lines.append(f"{i}. {TITLES[f.cause]} at step {f.step}, in {where}")
        lines.append(_paragraph(f.message))
        lines.append(_paragraph(f"What to do: {f.advice}"))
    if h.unwatched:
        lines += ["", "Not watched (the rest was):"]
        lines += [_paragraph(f"- {line}", _BULLET) for line in h.unwatched]
    return "\n".join(lines)


def _norms(h: MonitorHistory) -> str:
    """The total norms of the steps whose gradients were finite: a NaN/Inf step's norm is that of
    its finite values only (0 when all are NaN), no norm of the step."""
    clean = np.isfinite(h.total_norm) & ((h.grad_nan + h.grad_inf).sum(axis=1) == 0)
    total = h.total_norm[clean]
    if not total.size:
        return f"no step had finite gradients (NaN/Inf in all {h.steps.size} kept steps)"
    summary = (
        f"total gradient norm median {fmt(float(np.median(total)))}, max {fmt(float(total.max()))}"
    )
    if total.size < h.steps.size:
        summary += f" over the {total.size} steps with finite gradients"
    return summary


def _paragraph(text: str, hang: str = _INDENT) -> str:
    return textwrap.fill(text, _WIDTH, initial_indent=_INDENT, subsequent_indent=hang)
