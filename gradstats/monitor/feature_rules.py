"""The per-feature bad-input rules, over one input's InputFeatures: missing values (NaN per
feature), unscaled features, and outliers judged by robust statistics of each feature.

Each rule returns its findings with the kind in evidence["kind"] and in the message; the cause is
always bad_input, so that code switching on Finding.cause keeps working.
"""

from __future__ import annotations

import numpy as np

from gradstats.monitor.history import Finding, InputFeatures, MonitorThresholds, quiet_median
from gradstats.monitor.report import NAMED_AT_MOST, fmt, fmt_int, listed

# Inputs with 2 dimensions are tables: a feature's NaN count is its number of rows with NaN.
_TABLE_NDIM = 2
# A standard deviation needs at least two values; with one it is not known (not 0).
_VALUES_FOR_A_SPREAD = 2


def _nan_rows(f: InputFeatures, row: int, features: list[int], total: float) -> str:
    """', in 2 row(s)' or ', in 1 to 3 row(s)': the rows of a table input holding the NaN at one
    step, as far as per-feature counts tell (at least the largest count, at most their sum and
    the rows seen); '' for other inputs."""
    if f.ndim != _TABLE_NDIM:
        return ""
    least = int(f.nan[row, features].max())
    seen = f.count[row] + f.nan[row] + f.inf[row]  # every row holds one value of each feature
    most = int(min(total, seen.max()))
    return f", in {least} row(s)" if least == most else f", in {least} to {most} row(s)"


def _features(indices, values: dict[str, np.ndarray]) -> str:
    """'2 (mean 2.3e3, std 410), 5 (...)' for at most report.NAMED_AT_MOST features; a number not
    known (NaN) is left out, and a std of 0 is written "constant" (nothing to divide by)."""
    return listed([f"{j} ({', '.join(_numbers(j, values))})" for j in indices])


def _numbers(j: int, values: dict[str, np.ndarray]) -> list[str]:
    out = []
    for name, v in values.items():
        value = float(v[j])
        if name == "std" and value == 0:
            out.append("constant")
        elif not np.isnan(value):
            out.append(f"{name} {fmt(value)}")
    return out


def pooled_scale(f: InputFeatures) -> tuple[np.ndarray, np.ndarray]:
    """Per feature, the mean and standard deviation of all the finite values of the kept steps
    (what StandardScaler fitted on them finds), from each step's count, mean and RMS: the
    within-step variances plus the spread of the step means around the overall mean (Chan et
    al.'s pooling), so that batches of one value still give the spread across them. NaN where no
    value was seen (mean) or fewer than two (std)."""
    n = f.count
    total = n.sum(axis=0)
    seen = n > 0
    step_mean = np.where(seen, f.mean, 0.0)
    step_var = np.where(seen, np.maximum(f.rms**2 - f.mean**2, 0.0), 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = (n * step_mean).sum(axis=0) / total
        var = (n * (step_var + (step_mean - mean) ** 2)).sum(axis=0) / total
    return (
        np.where(total > 0, mean, np.nan),
        np.where(total >= _VALUES_FOR_A_SPREAD, np.sqrt(var), np.nan),
    )


def missing_values(f: InputFeatures, steps: np.ndarray) -> Finding | None:
    """NaN in the input: which features, the first step each had them, how many values (and, for
    tables, in how many rows)."""
    seen = f.first_nan >= 0
    if not seen.any():
        return None
    step = int(f.first_nan[seen].min())
    features = [int(j) for j in np.argsort(f.first_nan + np.where(seen, 0, np.inf)) if seen[j]]
    at_step = np.nonzero(steps == step)[0]
    counts = f.nan[at_step[0]] if at_step.size else np.full(f.num_features, np.nan)
    per_feature = ", ".join(
        f"{j} (first at step {int(f.first_nan[j])}"
        + (f", {fmt_int(counts[j])} at step {step})" if counts[j] > 0 else ")")
        for j in features[:NAMED_AT_MOST]
    )
    affected = int((f.nan.sum(axis=1) > 0).sum())
    total = float(counts[features].sum()) if at_step.size else float("nan")
    rows = _nan_rows(f, int(at_step[0]), features, total) if at_step.size else ""
    message = (
        f"missing values: NaN in {len(features)} of the {f.num_features} features of {f.site} "
        f"from step {step} ({fmt_int(total)} NaN value(s) at that step{rows}): features "
        f"{per_feature}; "
        f"{affected} of the kept steps had NaN inputs. Non-finite inputs make the loss and every "
        "gradient NaN."
    )
    evidence = {
        "kind": "missing_values",
        "nan": total,
        "features": tuple(features),
        "steps_affected": float(affected),
    }
    advice = (
        f"Impute the missing values of feature(s) {listed([str(j) for j in features])} before "
        "they reach the model (sklearn.impute.SimpleImputer(strategy='median'), or the feature's "
        "mean), or drop the rows that hold them; check torch.isfinite(batch).all() in the data "
        "pipeline while debugging."
    )
    return Finding("bad_input", (f.site,), step, evidence, message, advice)


def feature_scales(f: InputFeatures) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per feature over the kept steps: the median of the per-step RMS, mean and standard
    deviation (medians, so that a few bad batches do not set them)."""
    std = np.sqrt(np.maximum(f.rms**2 - f.mean**2, 0.0))
    return (
        quiet_median(f.rms, 0),
        quiet_median(f.mean, 0),
        quiet_median(np.where(np.isnan(f.rms), np.nan, std), 0),
    )


def unscaled_features(f: InputFeatures, steps: np.ndarray, th: MonitorThresholds) -> Finding | None:
    """Features far from standardized (typical RMS above unscaled_rms_limit) or whose scales spread
    over more than scale_spread_limit (largest RMS over the smallest non-zero one). The numbers
    to standardize with are each feature's mean and std over all the values seen (pooled_scale)."""
    rms = feature_scales(f)[0]
    mean, std = pooled_scale(f)
    live = np.isfinite(rms) & (rms > 0)  # a constant-zero feature has no scale to compare
    if not live.any():
        return None
    large = [int(j) for j in np.argsort(-np.where(live, rms, -np.inf)) if live[j]]
    far = [j for j in large if rms[j] > th.unscaled_rms_limit]
    spread = float(rms[large[0]] / rms[large[-1]])
    if not far and spread <= th.scale_spread_limit:
        return None
    observed = np.nonzero((f.count > 0).any(axis=1))[0]
    step = int(steps[observed[0]]) if observed.size else int(steps[0])
    named = far or large[:1]
    numbers = {"mean": mean, "std": std}
    message = (
        f"unscaled features: the features of {f.site} are not standardized; their typical RMS "
        f"ranges from {fmt(float(rms[large[-1]]))} (feature {large[-1]}) to "
        f"{fmt(float(rms[large[0]]))} (feature {large[0]}), a {fmt(spread)}-fold spread"
        + (
            f", and {len(far)} feature(s) have RMS above {fmt(th.unscaled_rms_limit)}: "
            f"{_features(far, {'rms': rms, **numbers})}"
            if far
            else ""
        )
        + ". Unscaled features make a few weights dominate and the training erratic."
    )
    evidence = {
        "kind": "unscaled_features",
        "largest_rms": float(rms[large[0]]),
        "smallest_rms": float(rms[large[-1]]),
        "spread": spread,
        "features": tuple(named),
    }
    advice = (
        "Standardize every feature before training, fitted on the training set: "
        "sklearn.preprocessing.StandardScaler, i.e. x' = (x - mean) / std, with the numbers seen "
        f"here for features {_features(large, numbers)}; or sklearn.preprocessing.RobustScaler "
        "(median and interquartile range) when the features have outliers."
    )
    return Finding("bad_input", (f.site,), step, evidence, message, advice)


def outliers(f: InputFeatures, steps: np.ndarray, th: MonitorThresholds) -> Finding | None:
    """Values far from their feature's robust centre: per feature, the median over the kept steps
    of the batch means is the centre and the median of the batch standard deviations the spread
    (not below the input's typical spread); a step whose smallest or largest value of a feature
    lies more than outlier_factor spreads away has an outlier."""
    observed = (f.count > 0).any(axis=1)
    if observed.sum() < th.min_history:
        return None
    _, centre, spread = feature_scales(f)
    # A feature's spread is never taken below the input's typical one: a feature that is nearly
    # always one value (a rare category, a pixel at the border) has no spread of its own, and its
    # rare other values are data, not outliers.
    floor = float(quiet_median(spread[spread > 0], 0))
    if not np.isfinite(floor):
        return None
    spread = np.maximum(np.nan_to_num(spread), floor)
    deviation = np.fmax(f.high - centre, centre - f.low)  # [k, F], NaN where not observed
    ratio = np.nan_to_num(deviation / spread, nan=0.0)
    bad = ratio > th.outlier_factor
    if not bad.any():
        return None
    row = int(np.nonzero(bad.any(axis=1))[0][0])
    features = [int(j) for j in np.argsort(-ratio[row]) if bad[row, j]]
    j = features[0]
    above = f.high[row, j] - centre[j] >= centre[j] - f.low[row, j]
    value = f.high[row, j] if above else f.low[row, j]
    step = int(steps[row])
    affected = int(bad.any(axis=1).sum())
    message = (
        f"outliers: feature {j} of {f.site} held {fmt(float(value))} at step {step}, "
        f"{fmt(float(ratio[row, j]))} times its typical spread {fmt(float(spread[j]))} away from "
        f"its median {fmt(float(centre[j]))} (robust statistics of the {int(observed.sum())} kept "
        "steps)"
        + (
            f"; other features with outliers then: {listed([str(k) for k in features[1:]])}"
            if len(features) > 1
            else ""
        )
        + f"; {affected} step(s) had outliers. Outliers blow up activations and gradients."
    )
    evidence = {
        "kind": "outliers",
        "value": float(value),
        "max_abs": float(abs(value)),
        "feature": float(j),
        "median": float(centre[j]),
        "spread": float(spread[j]),
        "ratio": float(ratio[row, j]),
        "features": tuple(features),
        "steps_affected": float(affected),
    }
    advice = (
        f"Find the rows behind step {step} (feature {j} = {fmt(float(value))}) and repair or drop "
        "them, or clip the feature to a sensible range; scale with "
        "sklearn.preprocessing.RobustScaler (median and interquartile range), which outliers do "
        f"not distort, rather than StandardScaler (for feature {j}: median about "
        f"{fmt(float(centre[j]))}, spread about {fmt(float(spread[j]))})."
    )
    return Finding("bad_input", (f.site,), step, evidence, message, advice)
