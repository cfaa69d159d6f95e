"""The rules: pure functions from a MonitorHistory (numpy arrays) to findings.

Gradient and activation rules live here; the input rules in bad_input.py.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np

from gradstats.monitor.bad_input import bad_input
from gradstats.monitor.history import Finding, MonitorHistory, MonitorThresholds, quiet_median
from gradstats.monitor.report import (
    NAMED_AT_MOST,
    TITLES,
    fmt,
    fmt_int,
    listed,
    site_label,
)

# Sustained growth also needs the norm to rise from one step to the next this often in the window,
# so that a noisy but flat series whose end happens to sit above its start does not count.
_GROWTH_RISING_SHARE = 0.8
# Findings of one step: causes before their consequences.
_ORDER = (
    "bad_input",
    "exploding_gradients",
    "vanishing_gradients",
    "nonfinite_gradients",
    "nonfinite_activations",
)
# Parameters with at least this many dimensions are weights (matrices, kernels, embeddings).
_WEIGHT_NDIM = 2


def _owner(name: str) -> str:
    """The module that owns a parameter: "0" for "0.weight", "(model)" for the root's own."""
    return name.rpartition(".")[0] or "(model)"


# ---------------------------------------------------------------------------- diagnosis


def diagnose_history(h: MonitorHistory, th: MonitorThresholds) -> list[Finding]:
    """Applies the detection rules to a history; findings sorted by step, then cause."""
    others = [*bad_input(h, th), *_nonfinite_activations(h), *_exploding(h, th), *_vanishing(h, th)]
    findings = _cross_reference([*others, *_nonfinite_gradients(h, others)])
    return sorted(findings, key=lambda f: (f.step, _ORDER.index(f.cause)))


def _cross_reference(findings: list[Finding]) -> list[Finding]:
    """Notes pointing from a consequence to its likely cause at the same or an earlier step."""
    bad_input_steps = {f.step for f in findings if f.cause == "bad_input"}
    out = []
    for f in findings:
        earlier = [
            g
            for g in findings
            if g.step < f.step and g.cause in ("exploding_gradients", "nonfinite_gradients")
        ]
        note = ""
        if f.cause in ("exploding_gradients", "nonfinite_gradients") and f.step in bad_input_steps:
            note = (
                "A model input was bad at this same step (see bad input data): fix the data first."
            )
        elif f.cause in ("nonfinite_gradients", "nonfinite_activations") and earlier:
            first = min(earlier, key=lambda g: g.step)
            note = (
                f"{TITLES[first.cause]} came first, at step {first.step}: if the optimizer "
                "applied them, the weights may now hold huge or NaN/Inf values; fix that first."
            )
        out.append(dataclasses.replace(f, message=f"{f.message} {note}") if note else f)
    return out


def _healthy_totals(h: MonitorHistory, before_step: int, skip_first: int) -> np.ndarray:
    keep = (h.steps < before_step) & (h.steps >= skip_first) & np.isfinite(h.total_norm)
    return h.total_norm[keep]


@dataclass(frozen=True)
class _Surge:
    """Where a rule saw the total norm explode: the finding's row, the row whose per-parameter norms
    are compared with those of base_rows, the norm there, its baseline and the sentence."""

    row: int
    end_row: int
    base_rows: np.ndarray
    value: float
    base: float
    text: str


def _exploding(h: MonitorHistory, th: MonitorThresholds) -> list[Finding]:
    total = h.total_norm
    surges = [s for s in (_first_jump(h, th), _first_growth(h, th)) if s is not None]
    if not surges:
        return []
    surge = min(surges, key=lambda s: s.row)
    step = int(h.steps[surge.row])
    finite = np.isfinite(total)
    peak_row = int(np.argmax(np.where(finite, total, -np.inf)))
    onset = step
    if (h.grad_first_nonfinite >= 0).any():
        onset = min(onset, int(h.grad_first_nonfinite[h.grad_first_nonfinite >= 0].min()))
    healthy = _healthy_totals(h, onset, th.min_history)
    if healthy.size >= th.min_history:
        suggestion = float(f"{np.percentile(healthy, th.clip_percentile):.2g}")
        advice = (
            f"Clip the total gradient norm at {fmt(suggestion)}, the "
            f"{th.clip_percentile:g}th percentile of the healthy total norms of steps "
            f"{max(th.min_history, int(h.steps[0]))}-{onset - 1} (rather than a guess of 1.0 or "
            "5.0): "
            f"gradstats.clip_grad_norm_(model.parameters(), max_norm={fmt(suggestion)}) before "
            f"optimizer.step(), or gradstats.ClipGradOptimizer(optimizer, max_norm="
            f"{fmt(suggestion)}, on_nonfinite='skip'). If the norm keeps growing, lower the "
            "learning rate; for recurrent networks prefer LSTM/GRU cells."
        )
    else:
        suggestion = math.nan
        advice = (
            "Clip the total gradient norm (gradstats.clip_grad_norm_ or ClipGradOptimizer): too "
            f"few healthy steps were seen before step {onset} to suggest a threshold, so start "
            "from the typical total norm of a short healthy run (monitor.scalars()) and lower the "
            "learning rate."
        )

    per_param = h.grad_norms[surge.end_row] / quiet_median(h.grad_norms[surge.base_rows], axis=0)
    per_param = np.where(np.isfinite(per_param), per_param, -np.inf)
    order = [int(j) for j in np.argsort(-per_param, kind="stable") if per_param[j] > -np.inf]
    exploded = [j for j in order if per_param[j] > th.explode_factor]
    where_cols = exploded or order[:NAMED_AT_MOST]
    where = tuple(h.names[j] for j in where_cols)
    rises = ", ".join(f"{h.names[j]} x{fmt(per_param[j])}" for j in where_cols[:NAMED_AT_MOST])
    peak = (
        f"; it peaked at {fmt(float(total[peak_row]))} at step {int(h.steps[peak_row])}"
        if peak_row != surge.end_row
        else ""
    )
    message = f"{surge.text}{peak}." + (f" Largest rises per parameter: {rises}." if rises else "")
    evidence = {
        "total_norm": surge.value,
        "baseline": surge.base,
        "ratio": surge.value / surge.base,
        "peak_norm": float(total[peak_row]),
        "peak_step": float(h.steps[peak_row]),
        "suggested_max_norm": suggestion,
        "healthy_steps": float(healthy.size),
    }
    return [Finding("exploding_gradients", where, step, evidence, message, advice)]


def _first_jump(h: MonitorHistory, th: MonitorThresholds) -> _Surge | None:
    """The first step far above the running median of the steps before it and above all of them,
    or above the absolute limit.

    Needing a new maximum as well keeps a late spike of a run whose norms have decayed (while
    converging) from counting: it is large only relative to a now-tiny median.
    """
    total = h.total_norm
    record = -math.inf
    for i, value in enumerate(total):
        if not math.isfinite(value):
            continue
        lo = max(0, i - th.median_window)
        before = total[lo:i]
        before = before[np.isfinite(before)]
        median = float(np.median(before)) if before.size else math.nan
        trusted = before.size >= th.min_history and median > 0
        if trusted and value > th.explode_factor * median and value > record:
            text = (
                f"total gradient norm {fmt(value)} at step {int(h.steps[i])}, "
                f"{fmt(value / median)} times its running median {fmt(median)} (over the "
                f"{before.size} steps before)"
            )
            return _Surge(i, i, np.arange(lo, i), float(value), median, text)
        if value > th.explode_abs_limit:
            text = (
                f"total gradient norm {fmt(value)} at step {int(h.steps[i])}, above the absolute "
                f"limit {fmt(th.explode_abs_limit)}"
            )
            base = median if before.size else th.explode_abs_limit
            rows = np.arange(lo, i) if before.size else np.array([i])
            return _Surge(i, i, rows, float(value), base, text)
        record = max(record, float(value))
    return None


def _first_growth(h: MonitorHistory, th: MonitorThresholds) -> _Surge | None:
    """The first growth_steps-long stretch over which the norm grew growth_factor-fold, rising at
    most steps, to a new maximum; the finding is placed where the growth began."""
    total, span = h.total_norm, th.growth_steps
    for end in range(span, total.size):
        seg = total[end - span : end + 1]
        if not np.isfinite(seg).all() or seg[0] <= 0:
            continue
        earlier = total[: end - span]
        earlier = earlier[np.isfinite(earlier)]
        rising = float(np.mean(np.diff(seg) > 0))
        if (
            seg[-1] >= th.growth_factor * seg[0]
            and rising >= _GROWTH_RISING_SHARE
            and (earlier.size == 0 or seg[-1] > earlier.max())
        ):
            start = end - span
            text = (
                f"total gradient norm grew {fmt(seg[-1] / seg[0])}-fold over {span} steps, from "
                f"{fmt(seg[0])} at step {int(h.steps[start])} to {fmt(seg[-1])} at step "
                f"{int(h.steps[end])}"
            )
            return _Surge(start, end, np.array([start]), float(seg[-1]), float(seg[0]), text)
    return None


def _vanishing(h: MonitorHistory, th: MonitorThresholds) -> list[Finding]:
    norms = h.grad_norms
    if norms.shape[0] < th.vanish_steps:
        return []
    finite = np.isfinite(norms)
    largest = np.max(np.where(finite, norms, -np.inf), axis=1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = norms / largest
    tiny = finite & (largest > 0) & (ratio < th.vanish_ratio)
    run = np.zeros(norms.shape[1], dtype=np.int64)
    start = np.full(norms.shape[1], -1)
    for i in range(norms.shape[0]):
        run = np.where(tiny[i], run + 1, 0)
        newly = (run >= th.vanish_steps) & (start < 0)
        start[newly] = i - th.vanish_steps + 1
    flagged = np.nonzero(start >= 0)[0]
    # A layer vanishes when its weights do. A 1-D parameter alone is no such sign: a bias right
    # before a normalisation layer, which cancels it, gets (numerically) no gradient by design.
    layers = {_owner(h.names[j]) for j in flagged if h.param_ndims[j] >= _WEIGHT_NDIM}
    flagged = np.array([j for j in flagged if _owner(h.names[j]) in layers], dtype=np.int64)
    if flagged.size == 0:
        return []
    row = int(start[flagged].min())
    step = int(h.steps[row])
    median_ratio = {int(j): float(np.median(ratio[tiny[:, j], j])) for j in flagged}
    zero = {int(j) for j in flagged if (norms[tiny[:, j], j] == 0).all()}
    where = tuple(h.names[j] for j in flagged)
    described = listed(
        [
            f"{h.names[j]} ({'exactly 0' if j in zero else fmt(median_ratio[j]) + ' x'})"
            for j in flagged
        ]
    )
    top = int(np.argmax(quiet_median(np.where(finite, norms, np.nan), axis=0)))
    largest_norm = float(quiet_median(largest[tiny.any(axis=1), 0]))
    message = (
        f"{flagged.size} of {norms.shape[1]} parameters, in layer(s) "
        f"{listed(sorted(layers, key=list(map(_owner, h.names)).index))}, had gradient norms below "
        f"{fmt(th.vanish_ratio)} x the largest layer's for {th.vanish_steps}+ consecutive steps "
        f"from step {step}: {described}, against {fmt(largest_norm)} for the largest "
        f"(typically {h.names[top]}). These layers barely learn."
    )
    ratios = list(median_ratio.values())
    evidence = {
        "layers": float(flagged.size),
        "smallest_ratio": min(ratios),
        "largest_ratio": max(ratios),
        "largest_norm": largest_norm,
        "consecutive_steps": float(run.max() if run.size else 0),
        "zero_layers": float(len(zero)),
    }
    advice = (
        "Use ReLU-family activations (ReLU, LeakyReLU, GELU) rather than sigmoid/tanh in hidden "
        "layers; initialise with He (torch.nn.init.kaiming_normal_) for ReLU or Glorot "
        "(torch.nn.init.xavier_uniform_) for tanh/sigmoid; add residual connections or "
        "normalisation (BatchNorm/LayerNorm). Where a value computed from these layers is a "
        "divisor, add an epsilon: tiny values there become Inf/NaN."
    )
    return [Finding("vanishing_gradients", where, step, evidence, message, advice)]


def _nonfinite_gradients(h: MonitorHistory, others: list[Finding]) -> list[Finding]:
    """The first step and parameters with NaN/Inf gradients; its advice points to the other
    findings (others) only when there are some."""
    first = h.grad_first_nonfinite
    if not (first >= 0).any():
        return []
    step = int(first[first >= 0].min())
    columns = np.nonzero(first == step)[0]
    where = tuple(h.names[j] for j in columns)
    bad_rows = (h.grad_nan + h.grad_inf).sum(axis=1) > 0
    affected = int(bad_rows.sum())
    in_window = np.nonzero(h.steps == step)[0]
    if in_window.size:
        row = int(in_window[0])
        nan, inf = float(h.grad_nan[row].sum()), float(h.grad_inf[row].sum())
        counted = f"{fmt_int(nan)} NaN and {fmt_int(inf)} Inf gradient values"
    else:
        nan = inf = math.nan
        counted = "NaN/Inf gradient values (before the kept window: counts no longer kept)"
    last = int(h.steps[bad_rows][-1]) if affected else step
    message = (
        f"{counted} at step {step}, in {len(where)} of {len(h.names)} parameters "
        f"({listed(where)}); {affected} of the "
        f"{h.steps.size} kept steps had NaN/Inf gradients (last at step {last})."
    )
    evidence = {"nan": nan, "inf": inf, "steps_affected": float(affected), "last_step": float(last)}
    if others:
        ordered = sorted(others, key=lambda g: (g.step, _ORDER.index(g.cause)))
        seen = listed([f"{TITLES[g.cause]} at step {g.step}" for g in ordered])
        source = f"see the other findings ({seen}), and check the loss"
    else:
        source = "no other finding points to it, so check the loss"
    unwatched = (
        "; also look at what the monitor could not watch (Not watched)" if h.unwatched else ""
    )
    advice = (
        "Keep such steps from reaching the weights: gradstats.ClipGradOptimizer(optimizer, "
        "max_norm=..., on_nonfinite='skip') or clip_grad_norm_(..., on_nonfinite='skip'). Then "
        f"remove the source: {source} for log(0) or division by zero{unwatched}. With float16, "
        "use torch.amp.GradScaler or bfloat16."
    )
    if all(h.site_is_input):
        advice += (
            " To name the first module whose output is NaN/Inf, create the monitor with "
            "watch_modules='all'."
        )
    return [Finding("nonfinite_gradients", where, step, evidence, message, advice)]


def _nonfinite_activations(h: MonitorHistory) -> list[Finding]:
    """The first module whose output held NaN/Inf while no model input (earlier in the same
    forward) did; a step whose inputs were bad is bad input, not the module's doing."""
    is_input = np.array(h.site_is_input, dtype=bool)
    if is_input.all():
        return []
    advice_for = (
        "Check {m}, the first watched module whose output held NaN/Inf while the model inputs "
        "were finite: its parameters for NaN/Inf (an earlier update may have corrupted them) and "
        "its arithmetic: log or sqrt of non-positive values, division by ~0, exp overflow, the "
        "float16 range (use bfloat16 or float32 there)."
    )
    latched = h.site_first_nonfinite
    window_start = int(h.site_steps[0]) if h.site_steps.size else 0
    old = [j for j in np.nonzero(~is_input & (latched >= 0) & (latched < window_start))[0]]
    if old:
        step = int(min(latched[j] for j in old))
        inputs_bad = (is_input & (latched == step)).any()
        if not inputs_bad:
            columns = [j for j in old if latched[j] == step]
            where = tuple(h.sites[j] for j in columns)
            labels = listed([site_label(h, j) for j in columns])
            message = (
                f"NaN/Inf in the output of {labels} at step {step} (before the kept window: "
                "counts and forward order no longer kept)."
            )
            evidence = {"nan": math.nan, "inf": math.nan, "max_abs": math.nan}
            return [
                Finding(
                    "nonfinite_activations",
                    where,
                    step,
                    evidence,
                    message,
                    advice_for.format(m=labels),
                )
            ]
    inputs_bad = ((h.site_nan + h.site_inf)[:, is_input] > 0).any(axis=1)
    for row in range(h.site_steps.size):
        order = h.site_order[row]
        seen = np.nonzero((order >= 0) & ~is_input)[0]
        if seen.size == 0 or inputs_bad[row]:
            continue
        first = int(seen[np.argmin(order[seen])])
        step = int(h.site_steps[row])
        site = h.sites[first]
        ranked = seen[np.argsort(order[seen], kind="stable")]
        later = [site_label(h, j) for j in ranked if j != first]
        nan, inf = float(h.site_nan[row, first]), float(h.site_inf[row, first])
        message = (
            f"the output of {site_label(h, first)} held {fmt_int(nan)} NaN and {fmt_int(inf)} "
            f"Inf values at step {step} "
            f"from finite inputs: the first watched module to produce them in that forward pass"
            + (f" (then {listed(later)})." if later else ".")
        )
        evidence = {"nan": nan, "inf": inf, "max_abs": float(h.site_max_abs[row, first])}
        return [
            Finding(
                "nonfinite_activations",
                (site,),
                step,
                evidence,
                message,
                advice_for.format(m=site_label(h, first)),
            )
        ]
    return []
