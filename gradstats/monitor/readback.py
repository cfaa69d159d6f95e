"""From buffers copied to the host to a MonitorHistory: the live rings (rows picked by step) and the
flight recorder's copies (rows already in step order) go through the same function."""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np
import torch
from torch import Tensor

from gradstats import ops
from gradstats.monitor.history import InputFeatures, MonitorHistory
from gradstats.monitor.rings import GRAD_SCALARS, NEVER, first_step, forward_order


@dataclasses.dataclass(frozen=True)
class Layout:
    """What the buffers do not say: names and kinds of the parameters and sites."""

    names: tuple[str, ...]
    param_ndims: tuple[int, ...]
    norm_type: float
    sites: tuple[str, ...]
    site_is_input: tuple[bool, ...]
    site_types: tuple[str, ...]
    feature_dims: dict[str, tuple[int, int]]  # per input site: feature dim, number of dims
    unwatched: tuple[str, ...]


def to_host(buffers: list[Tensor]) -> list[np.ndarray]:
    """The buffers as float64 numpy arrays, in one device-to-host copy."""
    if not buffers:
        return []
    flat = torch.cat([b.reshape(-1).to(torch.float64) for b in buffers]).numpy(force=True)
    parts, at = [], 0
    for b in buffers:
        parts.append(flat[at : at + b.numel()].reshape(tuple(b.shape)))
        at += b.numel()
    return parts


def build_history(
    lay: Layout,
    steps: np.ndarray,
    grad_rows: np.ndarray | None,
    grad_first: np.ndarray | None,
    site_steps: np.ndarray,
    sites: tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None] | None,
    features: dict[str, tuple[np.ndarray, np.ndarray | None]],
) -> MonitorHistory:
    """grad_rows [k, 3n + 3] for `steps`; sites: counts [k2, 2, m'], max_abs [k2, m'], first call
    [k2, m'] and first step [m'] (m' >= m columns) for `site_steps`; features: per input site, its
    rows [k2, 7, F] and first NaN/Inf steps [2, F]. Latches may be None (only the rows count)."""
    n, m = len(lay.names), len(lay.sites)
    if grad_rows is None:
        grad_rows = np.zeros((0, 3 * n + GRAD_SCALARS))
    grad_nan, grad_inf = grad_rows[:, n : 2 * n], grad_rows[:, 2 * n : 3 * n]
    latch = np.full(n, float(NEVER)) if grad_first is None else grad_first
    k2 = site_steps.size
    if sites is None:
        counts, max_abs, order = np.zeros((k2, 2, m)), np.full((k2, m), -np.inf), None
        site_first = np.full(m, float(NEVER))
    else:
        counts, max_abs, first_call, site_first = sites
        counts, max_abs = counts[:, :, :m].copy(), max_abs[:, :m].copy()
        order = None if first_call is None else forward_order(first_call[:, :m])
        site_first = np.full(m, float(NEVER)) if site_first is None else site_first[:m].copy()
    if order is None:
        order = np.full((k2, m), -1, dtype=np.int64)
    feature_history = []
    for site, (rows, first) in features.items():
        f = _input_features(site, *lay.feature_dims[site], rows, first, site_steps)
        feature_history.append(f)
        j = lay.sites.index(site)
        counts[:, 0, j], counts[:, 1, j] = f.nan.sum(axis=1), f.inf.sum(axis=1)
        max_abs[:, j] = rows[:, ops.FEATURE_EXTREME_ROWS].max(axis=(1, 2), initial=-np.inf)
        site_first[j] = min(site_first[j], _never(f.first_nan).min(), _never(f.first_inf).min())
    site_nan, site_inf = counts[:, 0], counts[:, 1]
    return MonitorHistory(
        names=lay.names,
        param_ndims=lay.param_ndims,
        norm_type=lay.norm_type,
        steps=steps,
        total_norm=grad_rows[:, 3 * n],
        clip_coef=grad_rows[:, 3 * n + 1],
        skipped=grad_rows[:, 3 * n + 2],
        grad_norms=grad_rows[:, :n],
        grad_nan=grad_nan,
        grad_inf=grad_inf,
        grad_first_nonfinite=first_step(latch, grad_nan + grad_inf, steps),
        sites=lay.sites,
        site_is_input=lay.site_is_input,
        site_types=lay.site_types,
        site_steps=site_steps,
        site_max_abs=np.where(np.isneginf(max_abs), np.nan, max_abs),
        site_nan=site_nan,
        site_inf=site_inf,
        site_order=order,
        site_first_nonfinite=first_step(site_first, site_nan + site_inf, site_steps),
        features=tuple(feature_history),
        unwatched=lay.unwatched,
    )


def _never(first: np.ndarray) -> np.ndarray:
    return np.where(first < 0, NEVER, first)


def _input_features(
    site: str, dim: int, ndim: int, rows: np.ndarray, first: np.ndarray | None, steps: np.ndarray
) -> InputFeatures:
    r = {name: rows[:, i] for i, name in enumerate(ops.FEATURE_ROWS)}
    count = r["count"]
    with warnings.catch_warnings(), np.errstate(invalid="ignore", divide="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)
        mean = np.where(count > 0, r["sum"] / count, np.nan)
        rms = np.where(count > 0, np.sqrt(r["sumsq"] / count), np.nan)
    latch = np.full((2, count.shape[1]), float(NEVER)) if first is None else first
    return InputFeatures(
        site=site,
        dim=dim,
        ndim=ndim,
        count=count,
        mean=mean,
        rms=rms,
        low=np.where(np.isneginf(r["neg_min"]), np.nan, -r["neg_min"]),
        high=np.where(np.isneginf(r["max"]), np.nan, r["max"]),
        nan=r["nan"],
        inf=r["inf"],
        first_nan=first_step(latch[0], r["nan"], steps),
        first_inf=first_step(latch[1], r["inf"], steps),
    )
