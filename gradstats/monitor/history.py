"""What a GradMonitor hands back: its thresholds, the history it recorded, and its findings.

Plain frozen dataclasses and numpy arrays, with no device tensors: the rules (diagnose.py), the
report (report.py) and the plot (plot.py) are pure functions of these.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass

import numpy as np

from gradstats._core import check_int

CAUSES = (
    "exploding_gradients",
    "vanishing_gradients",
    "bad_input",
    "nonfinite_gradients",
    "nonfinite_activations",
)


@dataclass(frozen=True)
class Finding:
    """One diagnosed problem.

    cause: one of CAUSES. where: parameter names (gradients), input names such as "input[0]" or
    "input[x]", or module names (activations). step: the number of monitor.step() calls made before
    the problem was first seen (the forward and backward before the first step() are step 0).
    evidence: the numbers behind it (bad_input findings also say which kind under "kind", and
    per-feature kinds the feature indices under "features").
    message: what was seen. advice: what to do about it.
    """

    cause: str
    where: tuple[str, ...]
    step: int
    evidence: dict[str, float | str | tuple[int, ...]]
    message: str
    advice: str

    def __str__(self) -> str:
        return f"{self.cause} at step {self.step} in {', '.join(self.where)}: {self.message}"


def _check_number(name: str, value: float, low: float, high: float, text: str) -> None:
    """A real number (not a bool) in (low, high], high excluded when it is inf."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not (number and low < value <= high and value < math.inf):
        raise ValueError(f"{name} must be {text}; got {value!r}")


@dataclass(frozen=True)
class MonitorThresholds:
    """The detection thresholds of a GradMonitor: GradMonitor(model, thresholds=MonitorThresholds(
    explode_factor=1e3)). Every field has a default; the values are checked when it is made.

    explode_factor: exploding: the total norm exceeds this multiple of its running median.
    explode_abs_limit: exploding, whatever the history (say at step 1): the total norm exceeds this
        (float32 squares overflow from 1.8e19; a healthy norm, even scaled by a float16 GradScaler,
        stays far below).
    growth_factor, growth_steps: exploding: the total norm grew this much in this many steps.
    median_window: steps in the running median.
    min_history: steps needed before a running statistic is trusted.
    vanish_ratio: vanishing: a parameter's gradient norm is below this fraction of the largest one's
        at the same step (exactly zero counts) ...
    vanish_steps: ... for at least this many consecutive steps.
    input_abs_limit: bad input: a finite input value larger than this in magnitude.
    input_jump_factor: bad input: an input's largest |x| exceeds this multiple of its running
        median.
    clip_percentile: the suggested clip threshold is this percentile of the healthy total norms
        (those before the first anomaly, leaving out the first min_history steps, whose norms right
        after initialisation are often far larger than later ones).
    Per-feature input statistics (bad input, kinds unscaled_features and outliers):
    unscaled_rms_limit: a feature whose typical RMS exceeds this is far from standardized (those
        have RMS 1) ...
    scale_spread_limit: ... and so are features whose typical RMS spread over more than this
        factor (largest over smallest non-zero).
    outlier_factor: a value more than this many robust spreads (median of the batch standard
        deviations) away from its feature's median of batch means is an outlier.
    """

    explode_factor: float = 100.0
    explode_abs_limit: float = 1e12
    growth_factor: float = 1e3
    growth_steps: int = 20
    median_window: int = 50
    min_history: int = 5
    vanish_ratio: float = 1e-5
    vanish_steps: int = 10
    input_abs_limit: float = 1e4
    input_jump_factor: float = 100.0
    clip_percentile: float = 90.0
    unscaled_rms_limit: float = 100.0
    scale_spread_limit: float = 1e4
    outlier_factor: float = 100.0

    def __post_init__(self) -> None:
        for name in ("growth_steps", "median_window", "min_history", "vanish_steps"):
            check_int(name, getattr(self, name), 1)
        for name in (
            "explode_factor",
            "growth_factor",
            "input_jump_factor",
            "unscaled_rms_limit",
            "scale_spread_limit",
            "outlier_factor",
        ):
            _check_number(name, getattr(self, name), 1.0, math.inf, "> 1")
        for name in ("input_abs_limit", "explode_abs_limit"):
            _check_number(name, getattr(self, name), 0.0, math.inf, "> 0")
        _check_number("vanish_ratio", self.vanish_ratio, 0.0, math.nextafter(1.0, 0), "in (0, 1)")
        _check_number("clip_percentile", self.clip_percentile, 0.0, 100.0, "in (0, 100]")


@dataclass(frozen=True)
class InputFeatures:
    """Per-feature statistics of one model input over the kept steps (rows: MonitorHistory's
    site_steps), feature dimension `dim` of the input, which has `ndim` dimensions.

    count [k, F]: finite values seen that step (0: not observed); mean, rms [k, F] of those (NaN
    when none); low, high [k, F]: smallest and largest finite value (NaN when none); nan, inf
    [k, F]: NaN and Inf counts; first_nan, first_inf [F]: the first step each feature held NaN /
    Inf (-1: never; whole run).
    """

    site: str
    dim: int
    ndim: int
    count: np.ndarray
    mean: np.ndarray
    rms: np.ndarray
    low: np.ndarray
    high: np.ndarray
    nan: np.ndarray
    inf: np.ndarray
    first_nan: np.ndarray
    first_inf: np.ndarray

    @property
    def num_features(self) -> int:
        return self.count.shape[1]


@dataclass(frozen=True)
class MonitorHistory:
    """The ring buffers copied to the host, oldest step first.

    Parameters: names and param_ndims (their numbers of dimensions).
    Gradient rows (one per monitor.step()): steps [k], total_norm [k], clip_coef [k] (1 when the
    statistics had no clip threshold), skipped [k] (1 skipped, 0 applied, NaN when not told),
    grad_norms / grad_nan / grad_inf [k, n] (norm NaN: no gradient that step), and
    grad_first_nonfinite [n], the first step each parameter had a NaN/Inf gradient (-1: never; kept
    for the whole run, beyond the window).
    Watched inputs and module outputs ("sites", with the module's class name in site_types, "" for
    inputs), one row per step including the one in progress:
    site_steps [k2], site_max_abs [k2, m] (largest finite |x|, NaN when not observed that step),
    site_nan / site_inf [k2, m], site_order [k2, m] (position in the forward order of the first
    call that saw NaN/Inf that step, -1 none), site_first_nonfinite [m] (-1: never; whole run).
    features: per-feature statistics of the model inputs that have them (InputFeatures).
    unwatched: what the monitor could not watch, and errors its hooks caught (one line each).
    """

    names: tuple[str, ...]
    param_ndims: tuple[int, ...]
    norm_type: float
    steps: np.ndarray
    total_norm: np.ndarray
    clip_coef: np.ndarray
    skipped: np.ndarray
    grad_norms: np.ndarray
    grad_nan: np.ndarray
    grad_inf: np.ndarray
    grad_first_nonfinite: np.ndarray
    sites: tuple[str, ...]
    site_is_input: tuple[bool, ...]
    site_types: tuple[str, ...]
    site_steps: np.ndarray
    site_max_abs: np.ndarray
    site_nan: np.ndarray
    site_inf: np.ndarray
    site_order: np.ndarray
    site_first_nonfinite: np.ndarray
    features: tuple[InputFeatures, ...] = ()
    unwatched: tuple[str, ...] = ()


def resolve_thresholds(
    given: MonitorThresholds | None, deprecated: dict[str, float]
) -> MonitorThresholds:
    """GradMonitor's thresholds: thresholds= and the deprecated keyword arguments (which win)."""
    unknown = sorted(set(deprecated) - {f.name for f in dataclasses.fields(MonitorThresholds)})
    if unknown:
        raise TypeError(f"GradMonitor() got unexpected keyword arguments: {', '.join(unknown)}")
    if given is not None and not isinstance(given, MonitorThresholds):
        raise TypeError(f"thresholds must be a MonitorThresholds; got {type(given).__name__}")
    base = given or MonitorThresholds()
    if not deprecated:
        return base
    spelled = ", ".join(f"{k}={v!r}" for k, v in deprecated.items())
    warnings.warn(
        f"GradMonitor({spelled}) is deprecated: pass "
        f"GradMonitor(..., thresholds=gradstats.MonitorThresholds({spelled}))",
        DeprecationWarning,
        stacklevel=3,
    )
    return dataclasses.replace(base, **deprecated)


def quiet_median(a: np.ndarray, axis: int | None = None) -> np.ndarray:
    """nanmedian without the all-NaN warning (an all-NaN slice gives NaN)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmedian(a, axis=axis)
