"""The bad-input rules: NaN/Inf in the model's inputs and inputs of extreme magnitude; for the
inputs with per-feature statistics, missing values, unscaled features and outliers per feature
(feature_rules.py) instead of NaN and extreme magnitudes of the input as a whole."""

from __future__ import annotations

import math

import numpy as np

from gradstats.monitor.feature_rules import missing_values, outliers, unscaled_features
from gradstats.monitor.history import Finding, MonitorHistory, MonitorThresholds
from gradstats.monitor.report import fmt, fmt_int, listed

_BAD_INPUT_ADVICE = {
    "nonfinite": (
        "Clean the data before it reaches the model: impute missing values (mean or median of the "
        "feature), drop or repair rows with NaN/Inf (torch.nan_to_num as a stopgap), and check "
        "torch.isfinite(batch).all() in the data pipeline while debugging."
    ),
    "extreme": (
        "Scale the features: standardise them, or use robust scaling (median and interquartile "
        "range, e.g. sklearn.preprocessing.RobustScaler) when outliers are present, and clip "
        "outliers to a sensible range before training."
    ),
}


def bad_input(h: MonitorHistory, th: MonitorThresholds) -> list[Finding]:
    """One finding per kind, at the first step any input had it; evidence["kind"] says which."""
    events: dict[str, list[tuple[int, int, dict[str, float]]]] = {"nonfinite": [], "extreme": []}
    per_feature = {f.site: f for f in h.features}
    findings = []
    for f in h.features:
        for rule in (missing_values(f, h.site_steps), unscaled_features(f, h.site_steps, th)):
            findings += [rule] if rule is not None else []
        found = outliers(f, h.site_steps, th)
        findings += [found] if found is not None else []
    for j, is_input in enumerate(h.site_is_input):
        if not is_input:
            continue
        features = per_feature.get(h.sites[j])
        # With per-feature statistics, NaN is a missing value and magnitudes are judged per feature.
        nan = h.site_nan[:, j] if features is None else np.zeros_like(h.site_nan[:, j])
        nonfinite = nan + h.site_inf[:, j]
        if features is None:
            latched = int(h.site_first_nonfinite[j])
        else:
            seen = features.first_inf[features.first_inf >= 0]
            latched = int(seen.min()) if seen.size else -1
        if latched >= 0 and (h.site_steps.size == 0 or latched < h.site_steps[0]):
            events["nonfinite"].append((latched, j, {"nan": math.nan, "inf": math.nan}))
        for row in np.nonzero(nonfinite > 0)[0]:
            events["nonfinite"].append(
                (
                    int(h.site_steps[row]),
                    j,
                    {
                        "nan": float(nan[row]),
                        "inf": float(h.site_inf[row, j]),
                        "max_abs": float(h.site_max_abs[row, j]),
                    },
                )
            )
        seen = np.nonzero(np.isfinite(h.site_max_abs[:, j]))[0] if features is None else []
        for k, row in enumerate(seen):
            value = float(h.site_max_abs[row, j])
            before = h.site_max_abs[seen[max(0, k - th.median_window) : k], j]
            typical = float(np.median(before)) if before.size >= th.min_history else math.nan
            jumped = typical > 0 and value > th.input_jump_factor * typical
            if value > th.input_abs_limit or jumped:
                events["extreme"].append(
                    (int(h.site_steps[row]), j, {"max_abs": value, "typical_max_abs": typical})
                )
    for kind, found in events.items():
        if not found:
            continue
        step = min(s for s, _, _ in found)
        at_step = [(j, ev) for s, j, ev in found if s == step]
        where = tuple(h.sites[j] for j, _ in at_step)
        affected = len({s for s, _, _ in found})
        if kind == "nonfinite":
            nan = sum(ev["nan"] for _, ev in at_step)
            inf = sum(ev["inf"] for _, ev in at_step)
            evidence = {"kind": kind, "nan": nan, "inf": inf, "steps_affected": float(affected)}
            counted = (
                f"{fmt_int(nan)} NaN and {fmt_int(inf)} Inf values"
                if math.isfinite(nan)
                else "NaN/Inf values (before the kept window: counts no longer kept)"
            )
            message = (
                f"non-finite values: {counted} in {listed(where)} at step {step}; {affected} "
                "step(s) had NaN/Inf "
                "inputs. Non-finite inputs make the loss and every gradient NaN."
            )
        else:
            j, ev = max(at_step, key=lambda item: item[1]["max_abs"])
            evidence = {
                "kind": kind,
                "max_abs": ev["max_abs"],
                "typical_max_abs": ev["typical_max_abs"],
                "abs_limit": th.input_abs_limit,
                "steps_affected": float(affected),
            }
            typical = (
                f", {fmt(ev['max_abs'] / ev['typical_max_abs'])} times its typical largest "
                f"value {fmt(ev['typical_max_abs'])}"
                if math.isfinite(ev["typical_max_abs"]) and ev["typical_max_abs"] > 0
                else ""
            )
            message = (
                f"extreme values: |x| up to {fmt(ev['max_abs'])} in {h.sites[j]} at step "
                f"{step}{typical} "
                f"(limit {fmt(th.input_abs_limit)}); {affected} step(s) had extreme inputs. "
                "Badly scaled features make activations and gradients overflow."
            )
        findings.append(
            Finding("bad_input", where, step, evidence, message, _BAD_INPUT_ADVICE[kind])
        )
    return findings
