"""GradMonitor: says why NaNs appear (exploding gradients, vanishing gradients, bad input data).

Each monitor.step() copies the per-parameter gradient norms and NaN/Inf counts of one fused pass
into ring buffers on the device; forward hooks do the same, with the same fused op, for the model's
inputs and optionally for module outputs (NaN/Inf counts and the largest finite magnitude). Nothing
is read back to the host until history(), diagnose(), report(), scalars() or plot() is called, so
watching a run adds no host synchronisation to a training step.
"""

from __future__ import annotations

import dataclasses
import math
import textwrap
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch
from torch import Tensor, nn

from gradstats import ops
from gradstats._core import CLIP_EPS, INF_ROW, NAN_ROW, NONFINITE_ROW, GradStats
from gradstats.distributed import statistics

CAUSES = (
    "exploding_gradients",
    "vanishing_gradients",
    "bad_input",
    "nonfinite_gradients",
    "nonfinite_activations",
)
_TITLES = {
    "exploding_gradients": "Exploding gradients",
    "vanishing_gradients": "Vanishing gradients",
    "bad_input": "Bad input data",
    "nonfinite_gradients": "NaN/Inf gradients",
    "nonfinite_activations": "NaN/Inf activations",
}
# Labels of the findings' step markers on the plot.
_SHORT = {
    "exploding_gradients": "exploding",
    "vanishing_gradients": "vanishing",
    "bad_input": "bad input",
    "nonfinite_gradients": "NaN grads",
    "nonfinite_activations": "NaN activations",
}
WatchModules = Union[str, Sequence[Union[str, nn.Module]], None]

# "Never" in the first-step-with-NaN latches: a power of two, so that the float64 snapshot holds it
# exactly, and larger than any step.
_NEVER = 2**62
# A message names at most this many tensors, a report's headline fewer; .where keeps them all.
_NAMED_AT_MOST = 5
_TITLE_NAMES = 3
# Sustained growth also needs the norm to rise from one step to the next this often in the window,
# so that a noisy but flat series whose end happens to sit above its start does not count.
_GROWTH_RISING_SHARE = 0.8
# Parameters with at least this many dimensions are weights (matrices, kernels, embeddings).
_WEIGHT_NDIM = 2
# A gradient ring row ends with the total norm, the clip coefficient and the skipped flag.
_GRAD_SCALARS = 3
# Cached column index tensors per parameter list (a list that changes every step must not grow it).
_INDEX_CACHE_SIZE = 64
# The root module's output, when watched, is called this.
_OUTPUT_SITE = "output"
_INPUT_SITE = "input"
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


@dataclass(frozen=True)
class Finding:
    """One diagnosed problem.

    cause: one of CAUSES. where: parameter names (gradients), input names such as "input[0]" or
    "input[x]", or module names (activations). step: the number of monitor.step() calls made before
    the problem was first seen (the forward and backward before the first step() are step 0).
    evidence: the numbers behind it. message: what was seen. advice: what to do about it.
    """

    cause: str
    where: tuple[str, ...]
    step: int
    evidence: dict[str, float]
    message: str
    advice: str

    def __str__(self) -> str:
        return f"{self.cause} at step {self.step} in {', '.join(self.where)}: {self.message}"


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


@dataclass(frozen=True)
class MonitorThresholds:
    """The detection thresholds of a GradMonitor (its constructor's arguments of the same names)."""

    explode_factor: float
    explode_abs_limit: float
    growth_factor: float
    growth_steps: int
    median_window: int
    min_history: int
    vanish_ratio: float
    vanish_steps: int
    input_abs_limit: float
    input_jump_factor: float
    clip_percentile: float


class GradMonitor:
    """Watches gradients, inputs and activations on the device and says why NaNs appear.

    Call monitor.step() after each backward (or give the monitor to ClipGradOptimizer, which calls
    monitor.step(stats=..., params=...) with the statistics it computed anyway). Then
    monitor.report() names the cause (exploding gradients, vanishing gradients, bad input data),
    where and when, with the evidence and what to do.

    Args:
        model: the module whose parameters (named by model.named_parameters()) are watched.
        window: steps kept in the ring buffers (on the device).
        watch_inputs: count NaN/Inf and track the largest magnitude of the model's floating-point
            inputs, named "input[i]" (positional) and "input[name]" (keyword).
        watch_modules: None, "all" (every leaf module) or module names / modules whose outputs are
            watched the same way; the first of them whose output holds NaN/Inf is named.
        norm_type: norm of the per-parameter gradient norms, when step() computes them itself.
        max_norm: the clip threshold in use, drawn on the plot (else inferred from clipped steps).
        explode_factor: exploding: the total norm exceeds this multiple of its running median.
        explode_abs_limit: exploding, whatever the history (say at step 1): the total norm exceeds
            this (float32 squares overflow from 1.8e19; a healthy norm, even scaled by a float16
            GradScaler, stays far below).
        growth_factor, growth_steps: exploding: the total norm grew this much in this many steps.
        median_window: steps in the running median.
        min_history: steps needed before a running statistic is trusted.
        vanish_ratio: vanishing: a parameter's gradient norm is below this fraction of the largest
            one's at the same step (exactly zero counts) ...
        vanish_steps: ... for at least this many consecutive steps.
        input_abs_limit: bad input: a finite input value larger than this in magnitude.
        input_jump_factor: bad input: an input's largest |x| exceeds this multiple of its running
            median.
        clip_percentile: the suggested clip threshold is this percentile of the healthy total norms
            (those before the first anomaly, leaving out the first min_history steps, whose norms
            right after initialisation are often far larger than later ones).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        window: int = 512,
        watch_inputs: bool = True,
        watch_modules: WatchModules = None,
        norm_type: float = 2.0,
        max_norm: float | None = None,
        explode_factor: float = 100.0,
        explode_abs_limit: float = 1e12,
        growth_factor: float = 1e3,
        growth_steps: int = 20,
        median_window: int = 50,
        min_history: int = 5,
        vanish_ratio: float = 1e-5,
        vanish_steps: int = 10,
        input_abs_limit: float = 1e4,
        input_jump_factor: float = 100.0,
        clip_percentile: float = 90.0,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"GradMonitor: model must be a torch.nn.Module; got {type(model)}")
        _check_int("window", window, 2)
        for name, value in (
            ("growth_steps", growth_steps),
            ("median_window", median_window),
            ("min_history", min_history),
            ("vanish_steps", vanish_steps),
        ):
            _check_int(name, value, 1)
        for name, value in (
            ("explode_factor", explode_factor),
            ("growth_factor", growth_factor),
            ("input_jump_factor", input_jump_factor),
        ):
            _check_range(name, value, 1.0, math.inf, "> 1")
        _check_range("vanish_ratio", vanish_ratio, 0.0, 1.0, "in (0, 1)")
        _check_range("input_abs_limit", input_abs_limit, 0.0, math.inf, "> 0")
        _check_range("explode_abs_limit", explode_abs_limit, 0.0, math.inf, "> 0")
        if not 0 < clip_percentile <= 100:
            raise ValueError(f"clip_percentile must be in (0, 100]; got {clip_percentile!r}")
        if not float(norm_type) > 0:
            raise ValueError(f"norm_type must be > 0 or inf; got {norm_type!r}")
        if max_norm is not None and not float(max_norm) > 0:
            raise ValueError(f"max_norm must be a positive number or None; got {max_norm!r}")
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError("GradMonitor: the model has no parameter that requires grad")

        self.window = window
        self.norm_type = float(norm_type)
        self.max_norm = None if max_norm is None else float(max_norm)
        self.thresholds = MonitorThresholds(
            explode_factor=float(explode_factor),
            explode_abs_limit=float(explode_abs_limit),
            growth_factor=float(growth_factor),
            growth_steps=growth_steps,
            median_window=median_window,
            min_history=min_history,
            vanish_ratio=float(vanish_ratio),
            vanish_steps=vanish_steps,
            input_abs_limit=float(input_abs_limit),
            input_jump_factor=float(input_jump_factor),
            clip_percentile=float(clip_percentile),
        )
        self.names = tuple(n for n, _ in named)
        self._params = [p for _, p in named]
        self._column = {id(p): i for i, p in enumerate(self._params)}
        self._step = 0
        self._seq = 0
        self._device: torch.device | None = None
        # Gradients: one float64 row per step (layout in _allocate_grad_ring), written by one cat.
        self._grad_ring: Tensor | None = None
        # The rings' rows as views made once: indexing a tensor from Python costs microseconds.
        self._grad_rows: list[Tensor] = []
        self._site_count_rows: list[Tensor] = []
        self._site_max_rows: list[Tensor] = []
        self._call_rows: list[Tensor] = []
        self._blank_row: Tensor | None = None
        self._grad_first: Tensor | None = None
        self._constants: dict[str, Tensor] = {}
        # Watched inputs and outputs ("sites"): NaN and Inf counts, largest finite |x| (float32:
        # the fused op's norm dtype for all but float64 inputs), first step with NaN/Inf.
        self._site_counts: Tensor | None = None
        self._site_max: Tensor | None = None
        self._site_first: Tensor | None = None
        # Per step, whether each hook call saw NaN/Inf (device) and the sites of each call (host):
        # the first call that saw any names the first site to produce them.
        self._call_log: Tensor | None = None
        self._calls: list[list[tuple[int, ...]]] = [[] for _ in range(window)]
        self._sites: dict[str, int] = {}
        self._site_is_input: list[bool] = []
        self._site_types: dict[str, str] = {}
        self._index_cache: dict[tuple, Tensor] = {}
        self._placements: dict[tuple, tuple[Tensor, Tensor | None]] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        if watch_inputs:
            self._handles.append(model.register_forward_pre_hook(self._on_input, with_kwargs=True))
        for name, module in _resolve_modules(model, watch_modules):
            self._site_types[name] = type(module).__name__
            self._handles.append(module.register_forward_hook(partial(self._on_output, name)))

    # ----------------------------------------------------------------- recording (no host sync)
    #
    # A step costs one torch.cat into the gradient ring plus two resets of the site ring; a hook
    # call costs the fused op plus three small writes. Each small op costs microseconds of CPU
    # time, so there are as few as possible: the first-step-with-NaN latches are brought up to
    # date once every `window` steps (_fold_*), just before the rings start to overwrite.

    @property
    def num_steps(self) -> int:
        """The number of monitor.step() calls made so far (the step now being observed)."""
        return self._step

    def step(
        self,
        stats: GradStats | None = None,
        params: Sequence[Tensor] | None = None,
        *,
        skipped: Tensor | bool | None = None,
    ) -> None:
        """Records this step's gradient statistics in the ring buffers, on the device, and starts
        the next step.

        stats: the GradStats already computed for this step (with per-tensor norms), whose tensors
            are the gradients of params, in order; without params, of the model's parameters that
            have a gradient, in model order. Without stats, one fused pass computes them (norms of
            the finite values; the NaN/Inf counts say the rest).
        skipped: whether the optimizer skipped this step (a 0-dim tensor on the device is fine),
            marked on the plot.
        """
        with torch.no_grad():
            params_list, stats = self._resolve_step(stats, params)
            self._set_device()
            if self._grad_ring is None:
                with _normal_tensors():
                    self._allocate_grad_ring()
            elif self._step % self.window == 0:
                self._fold_grad_ring()
            counts = self._here(stats.counts)
            parts = [
                self._here(stats.norms),
                counts[NAN_ROW, :-1],
                counts[INF_ROW, :-1],
                self._here(stats.total_norm).reshape(1),
                self._constants["one"]
                if stats.clip_coef is None
                else self._here(stats.clip_coef).reshape(1),
                self._skipped_value(skipped),
            ]
            row = self._grad_rows[self._step % self.window]
            placement = self._grad_positions(params_list)
            if placement is None:
                # cat casts each part straight into the float64 row: counts stay exact.
                torch.cat(parts, out=row)
            else:
                positions, keep = placement
                size = 3 * len(params_list) + _GRAD_SCALARS
                values = torch.empty(size, dtype=torch.float64, device=self._device)
                torch.cat(parts, out=values)
                if keep is not None:
                    values = values.index_select(0, keep)
                row.copy_(self._blank_row).index_copy_(0, positions, values)
        self._step += 1
        self._seq = 0
        slot = self._step % self.window
        self._calls[slot] = []
        if self._site_counts is not None:
            if slot == 0:
                self._fold_site_ring()
            self._site_count_rows[slot].zero_()
            self._site_max_rows[slot].fill_(-math.inf)

    def _resolve_step(
        self, stats: GradStats | None, params: Sequence[Tensor] | None
    ) -> tuple[list[Tensor], GradStats]:
        if params is not None:
            params = list(params)
        if stats is None:
            candidates = self._params if params is None else params
            with_grad = [p for p in candidates if p.grad is not None]
            if not with_grad:
                raise RuntimeError(
                    "GradMonitor.step(): no watched parameter has a gradient; call it after "
                    "loss.backward() and before optimizer.zero_grad()"
                )
            grads = [p.grad.detach() for p in with_grad]
            return with_grad, statistics(grads, self.norm_type, math.inf, "zero")
        if not isinstance(stats, GradStats):
            raise TypeError(f"GradMonitor.step(): stats must be a GradStats; got {type(stats)}")
        if stats.norms is None:
            raise ValueError(
                "GradMonitor.step(): stats has no per-tensor norms; compute them with "
                "grad_stats(..., per_tensor=True)"
            )
        if params is None:
            params = [p for p in self._params if p.grad is not None]
        if len(params) != stats.num_tensors:
            raise ValueError(
                f"GradMonitor.step(): stats cover {stats.num_tensors} tensors but {len(params)} "
                "parameters were given (params must list the stats' tensors, in order)"
            )
        return params, stats

    def _skipped_value(self, skipped: Tensor | bool | None) -> Tensor:
        if skipped is None:
            return self._constants["nan"]
        if isinstance(skipped, Tensor):
            return self._here(skipped).reshape(1)
        return self._constants["one" if skipped else "zero"]

    def _grad_positions(self, params: list[Tensor]) -> tuple[Tensor, Tensor | None] | None:
        """Where this step's values go in a ring row, and which of them to keep (None: all); None
        for all parameters in model order. Parameters the monitor does not know (say a learnable
        loss weight held by the optimizer) are left out, with a warning the first time."""
        if len(params) == len(self._params) and all(a is b for a, b in zip(params, self._params)):
            return None
        key = tuple(map(id, params))
        cached = self._placements.get(key)
        if cached is None:
            known = [
                (i, self._column[id(p)]) for i, p in enumerate(params) if id(p) in self._column
            ]
            columns = [c for _, c in known]
            n, k = len(self._params), len(params)
            tail = [3 * n + j for j in range(_GRAD_SCALARS)]
            layout = columns + [n + c for c in columns] + [2 * n + c for c in columns] + tail
            keep = None
            if len(known) < k:
                strangers = [tuple(p.shape) for p in params if id(p) not in self._column]
                warnings.warn(
                    f"GradMonitor.step(): {len(strangers)} of the {k} parameters given (shapes "
                    f"{_names([str(s) for s in strangers])}) are not parameters of the monitored "
                    "model that require grad; their statistics are not recorded",
                    stacklevel=3,
                )
                rows = [i for i, _ in known]
                slots = rows + [k + i for i in rows] + [2 * k + i for i in rows]
                scalars = [3 * k + j for j in range(_GRAD_SCALARS)]
                keep = self._new_index(("keep", *key), slots + scalars)
            cached = (self._new_index(key, layout), keep)
            if len(self._placements) >= _INDEX_CACHE_SIZE:
                self._placements.clear()
            self._placements[key] = cached
        return cached

    def _new_index(self, key: tuple, values: list[int]) -> Tensor:
        if len(self._index_cache) >= _INDEX_CACHE_SIZE:
            self._index_cache.clear()
        with _normal_tensors():
            index = torch.tensor(values, dtype=torch.long, device=self._device)
        self._index_cache[key] = index
        return index

    def _set_device(self) -> None:
        """The rings live with the model's (first) parameter, where the gradients are: chosen at the
        first observation, so that model.to(device) after creating the monitor is fine."""
        if self._device is None:
            self._device = self._params[0].device

    def _here(self, t: Tensor) -> Tensor:
        if t.device == self._device:
            return t
        return t.to(self._device, non_blocking=self._device.type == "cuda")

    def _allocate_grad_ring(self) -> None:
        n, dev = len(self._params), self._device
        f64 = {"dtype": torch.float64, "device": dev}
        # A row: norms [n] | NaN counts [n] | Inf counts [n] | total norm, clip coef, skipped.
        blank = torch.cat(
            [
                torch.full((n,), math.nan, **f64),
                torch.zeros(2 * n, **f64),
                torch.tensor([math.nan, 1.0, math.nan], **f64),
            ]
        )
        self._blank_row = blank
        self._grad_ring = blank.repeat(self.window, 1)
        self._grad_rows = list(self._grad_ring.unbind(0))
        self._grad_first = torch.full((n,), _NEVER, dtype=torch.int64, device=dev)
        self._constants = {
            "nan": torch.full((1,), math.nan, **f64),
            "one": torch.ones(1, **f64),
            "zero": torch.zeros(1, **f64),
        }

    def _fold_grad_ring(self) -> None:
        """Moves each parameter's first step with NaN/Inf from the ring into the latch, before the
        ring overwrites its rows; row r then holds step (num_steps - window + r)."""
        n, ring = len(self._params), self._grad_ring
        bad = (ring[:, n : 2 * n] + ring[:, 2 * n : 3 * n]) > 0
        _fold(self._grad_first, bad, self._step - self.window, self._device)

    def _fold_site_ring(self) -> None:
        bad = self._site_counts.sum(1) > 0
        _fold(self._site_first, bad, self._step - self.window, self._device)

    def _on_input(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        leaves: list[tuple[str, Tensor]] = []
        for i, arg in enumerate(args):
            _floating_leaves(f"{_INPUT_SITE}[{i}]", arg, leaves)
        for key, arg in kwargs.items():
            _floating_leaves(f"{_INPUT_SITE}[{key}]", arg, leaves)
        if leaves:
            self._observe(tuple(n for n, _ in leaves), [t for _, t in leaves], is_input=True)

    def _on_output(self, name: str, module: nn.Module, args: tuple, output: Any) -> None:
        leaves: list[tuple[str, Tensor]] = []
        _floating_leaves(name, output, leaves)
        if leaves:
            self._observe((name,) * len(leaves), [t for _, t in leaves], is_input=False)

    def _observe(self, names: tuple[str, ...], tensors: list[Tensor], is_input: bool) -> None:
        """NaN/Inf counts and largest finite |x| of the tensors, accumulated into this step's row
        (several forwards in one step add up), and whether this call saw NaN/Inf."""
        with torch.no_grad():  # which also makes detaching the tensors needless
            device = tensors[0].device
            if all(t.device == device for t in tensors):
                _, _, norms, counts = ops.stats(tensors, math.inf, math.inf, "zero")
            else:
                st = statistics(tensors, math.inf, math.inf, "zero")
                norms, counts = st.norms, st.counts
            self._set_device()
            index = self._site_columns(names, is_input)
            slot = self._step % self.window
            if self._seq >= self._call_log.shape[1]:
                size = max(self._seq + 1, 2 * self._call_log.shape[1])
                with _normal_tensors():
                    self._call_log = _grow_columns(self._call_log, size, False)
                self._call_rows = list(self._call_log.unbind(0))
            counts = self._here(counts)
            self._site_count_rows[slot].index_add_(1, index, counts[NAN_ROW : INF_ROW + 1, :-1])
            self._site_max_rows[slot].scatter_reduce_(
                0, index, self._here(norms).to(torch.float32), "amax"
            )
            self._call_rows[slot][self._seq].copy_(counts[NONFINITE_ROW, -1])
        self._calls[slot].append(tuple(self._sites[name] for name in names))
        self._seq += 1

    def _site_columns(self, names: tuple[str, ...], is_input: bool) -> Tensor:
        key = ("site", *names)
        index = self._index_cache.get(key)
        if index is None:
            for name in dict.fromkeys(names):
                if name not in self._sites:
                    self._sites[name] = len(self._sites)
                    self._site_is_input.append(is_input)
            with _normal_tensors():
                self._grow_site_ring(len(self._sites))
            index = self._new_index(key, [self._sites[n] for n in names])
        return index

    def _grow_site_ring(self, needed: int) -> None:
        """Sites appear as the forward runs; the columns grow (doubling) when one needs room."""
        if self._site_counts is None:
            w, dev = self.window, self._device
            self._site_counts = torch.zeros((w, 2, needed), dtype=torch.int64, device=dev)
            self._site_max = torch.full((w, needed), -math.inf, dtype=torch.float32, device=dev)
            self._site_first = torch.full((needed,), _NEVER, dtype=torch.int64, device=dev)
            self._call_log = torch.zeros((w, needed), dtype=torch.bool, device=dev)
            self._call_rows = list(self._call_log.unbind(0))
        else:
            have = self._site_first.numel()
            if needed <= have:
                return
            size = max(needed, 2 * have)
            self._site_counts = _grow_columns(self._site_counts, size, 0)
            self._site_max = _grow_columns(self._site_max, size, -math.inf)
            self._site_first = _grow_columns(self._site_first, size, _NEVER)
        self._site_count_rows = list(self._site_counts.unbind(0))
        self._site_max_rows = list(self._site_max.unbind(0))

    # ---------------------------------------------------------------------------- hooks

    def close(self) -> None:
        """Removes the forward hooks. What was recorded stays readable."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __enter__(self) -> GradMonitor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"GradMonitor({len(self.names)} parameters, {len(self._sites)} watched inputs/outputs, "
            f"{self._step} steps, window={self.window}, hooks={'on' if self._handles else 'off'})"
        )

    # ---------------------------------------------------------------- reading (one sync each)

    def history(self) -> MonitorHistory:
        """The ring buffers on the host, oldest step first (one device-to-host copy)."""
        buffers = [
            b
            for b in (
                self._grad_ring,
                self._grad_first,
                self._site_counts,
                self._site_max,
                self._site_first,
                self._call_log,
            )
            if b is not None
        ]
        flat = (
            torch.cat([b.reshape(-1).to(torch.float64) for b in buffers]).cpu().numpy()
            if buffers
            else np.zeros(0)
        )
        parts, at = [], 0
        for b in buffers:
            parts.append(flat[at : at + b.numel()].reshape(tuple(b.shape)))
            at += b.numel()
        w, n, m = self.window, len(self.names), len(self._sites)
        if self._grad_ring is None:
            ring, grad_first = np.zeros((w, 3 * n + _GRAD_SCALARS)), np.full(n, float(_NEVER))
        else:
            ring, grad_first = parts[0], parts[1]
        kept = min(self._step, w)
        steps = np.arange(self._step - kept, self._step)
        rows = ring[steps % w]
        grad_nan, grad_inf = rows[:, n : 2 * n], rows[:, 2 * n : 3 * n]

        site_steps = np.arange(max(0, self._step - w + 1), self._step + 1)
        site_rows = site_steps % w
        if self._site_counts is None:
            counts, max_abs = np.zeros((w, 2, 0)), np.zeros((w, 0))
            site_first, call_log = np.zeros(0), np.zeros((w, 0))
        else:
            counts, max_abs, site_first, call_log = parts[-4:]
        site_nan, site_inf = counts[site_rows, 0, :m], counts[site_rows, 1, :m]
        max_abs = max_abs[site_rows, :m]
        order = np.full((site_steps.size, m), -1, dtype=np.int64)
        for i, slot in enumerate(site_rows):
            position = 0
            for seq, columns in enumerate(self._calls[slot]):
                if call_log[slot, seq] > 0:
                    fresh = [c for c in columns if order[i, c] < 0]
                    order[i, fresh] = position
                    position += bool(fresh)
        return MonitorHistory(
            names=self.names,
            param_ndims=tuple(p.dim() for p in self._params),
            norm_type=self.norm_type,
            steps=steps,
            total_norm=rows[:, 3 * n],
            clip_coef=rows[:, 3 * n + 1],
            skipped=rows[:, 3 * n + 2],
            grad_norms=rows[:, :n],
            grad_nan=grad_nan,
            grad_inf=grad_inf,
            grad_first_nonfinite=_first_step(grad_first, grad_nan + grad_inf, steps),
            sites=tuple(self._sites),
            site_is_input=tuple(self._site_is_input),
            site_types=tuple(self._site_types.get(name, "") for name in self._sites),
            site_steps=site_steps,
            site_max_abs=np.where(np.isneginf(max_abs), np.nan, max_abs),
            site_nan=site_nan,
            site_inf=site_inf,
            site_order=order,
            site_first_nonfinite=_first_step(site_first[:m], site_nan + site_inf, site_steps),
        )

    def diagnose(self) -> list[Finding]:
        """The problems seen in the kept steps (NaN/Inf first seen: over the whole run), oldest
        first. Healthy training gives an empty list. One device-to-host copy."""
        return diagnose_history(self.history(), self.thresholds)

    def report(self) -> str:
        """What went wrong, where, when, the evidence and what to do, as text for a person."""
        h = self.history()
        return format_report(h, diagnose_history(h, self.thresholds))

    def scalars(self, prefix: str = "gradstats/") -> dict[str, float]:
        """The last recorded step as a flat {name: number} dict for TensorBoard or W&B: total norm,
        clip coefficient, NaN/Inf gradient count, per-parameter norms, and each watched input's or
        output's largest finite |x| and NaN/Inf count. One device-to-host copy."""
        if self._step == 0:
            raise RuntimeError("GradMonitor.scalars(): no step recorded yet; call monitor.step()")
        slot = (self._step - 1) % self.window
        n, m = len(self.names), len(self._sites)
        row = self._grad_ring[slot]
        parts = [row[3 * n : 3 * n + 2], row[n : 3 * n].sum().reshape(1), row[:n]]
        if m:
            parts += [
                self._site_max[slot, :m].to(torch.float64),
                self._site_counts[slot, :, :m].sum(0).to(torch.float64),
            ]
        values = torch.cat(parts).tolist()
        out = {
            f"{prefix}total_norm": values[0],
            f"{prefix}clip_coef": values[1],
            f"{prefix}nonfinite_grads": values[2],
        }
        out.update({f"{prefix}grad_norm/{k}": v for k, v in zip(self.names, values[3 : 3 + n])})
        site_values = values[3 + n :]
        for i, site in enumerate(self._sites):
            if site_values[i] != -math.inf:  # not observed in that step
                out[f"{prefix}max_abs/{site}"] = site_values[i]
                out[f"{prefix}nonfinite/{site}"] = site_values[m + i]
        return out

    def log_to_tensorboard(
        self, writer: Any, step: int | None = None, prefix: str = "gradstats/"
    ) -> dict[str, float]:
        """Writes scalars() with writer.add_scalar (a torch.utils.tensorboard.SummaryWriter or any
        writer with that method) at global step `step` (default: the last recorded step)."""
        values = self.scalars(prefix)
        global_step = self._step - 1 if step is None else step
        for key, value in values.items():
            writer.add_scalar(key, value, global_step)
        return values

    def plot(self, path: str | Path, *, title: str | None = None) -> Path:
        """Writes a PNG: per-parameter gradient-norm heatmap over the kept steps (log scale) above
        the total norm (clip threshold, clipped, skipped and NaN/Inf steps, findings marked)."""
        try:
            from matplotlib.figure import Figure
        except ImportError as exc:
            raise ImportError(
                "GradMonitor.plot() needs matplotlib: pip install gradstats[plot] "
                "(or pip install matplotlib)"
            ) from exc
        h = self.history()
        if h.steps.size == 0:
            raise RuntimeError("GradMonitor.plot(): no step recorded yet; call monitor.step()")
        findings = diagnose_history(h, self.thresholds)
        fig = _draw(Figure, h, findings, self.max_norm, self.thresholds, title)
        path = Path(path)
        fig.savefig(path, dpi=_PLOT_DPI, bbox_inches="tight")
        return path


# ------------------------------------------------------------------------------ helpers


def _check_int(name: str, value: int, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}; got {value!r}")


def _check_range(name: str, value: float, low: float, high: float, text: str) -> None:
    if not (isinstance(value, (int, float)) and low < value < high):
        raise ValueError(f"{name} must be {text}; got {value!r}")


def _normal_tensors() -> torch.inference_mode:
    """Buffers made during an inference_mode forward must still take in-place updates later."""
    return torch.inference_mode(False)


def _fold(latch: Tensor, bad: Tensor, first_step: int, device: torch.device) -> None:
    """latch = min(latch, the first step whose row in bad [window, k] is set), on the device;
    row r of bad is step first_step + r."""
    steps = torch.arange(first_step, first_step + bad.shape[0], device=device).unsqueeze(1)
    torch.minimum(latch, torch.where(bad, steps, _NEVER).amin(0), out=latch)


def _first_step(latch: np.ndarray, bad_counts: np.ndarray, steps: np.ndarray) -> np.ndarray:
    """The first step with NaN/Inf per column, from the latch and the kept rows; -1 for never."""
    bad = bad_counts > 0
    in_rows = np.where(bad.any(axis=0), steps[np.argmax(bad, axis=0)] if steps.size else 0, _NEVER)
    first = np.minimum(latch, in_rows)
    return np.where(first >= _NEVER, -1, first).astype(np.int64)


def _grow_columns(t: Tensor, size: int, fill: float | bool) -> Tensor:
    """t with its last dimension grown to size, the new columns set to fill."""
    grown = torch.full((*t.shape[:-1], size), fill, dtype=t.dtype, device=t.device)
    grown[..., : t.shape[-1]].copy_(t)
    return grown


def _floating_leaves(name: str, obj: Any, out: list[tuple[str, Tensor]]) -> None:
    """The floating-point (and complex) tensors in nested tuples, lists and dicts."""
    if isinstance(obj, Tensor):
        if obj.is_floating_point() or obj.is_complex():
            out.append((name, obj))
    elif isinstance(obj, (list, tuple)):
        for i, item in enumerate(obj):
            _floating_leaves(f"{name}[{i}]" if name.startswith(_INPUT_SITE) else name, item, out)
    elif isinstance(obj, dict):
        for key, item in obj.items():
            _floating_leaves(f"{name}[{key}]" if name.startswith(_INPUT_SITE) else name, item, out)


def _resolve_modules(model: nn.Module, watch: WatchModules) -> list[tuple[str, nn.Module]]:
    if watch is None:
        return []
    named = list(model.named_modules())
    if isinstance(watch, str):
        if watch != "all":
            raise ValueError(
                f"watch_modules must be None, 'all' or a list of module names or modules; got "
                f"{watch!r}"
            )
        leaves = [(n or _OUTPUT_SITE, m) for n, m in named if next(m.children(), None) is None]
        return leaves
    by_name = dict(named)
    by_id = {id(m): n for n, m in named}
    out = []
    for item in watch:
        if isinstance(item, nn.Module):
            if id(item) not in by_id:
                raise ValueError(f"watch_modules: {type(item).__name__} is not part of the model")
            name = by_id[id(item)]
        elif isinstance(item, str):
            if item not in by_name:
                known = ", ".join(repr(n) for n, _ in named[1 : 1 + _NAMED_AT_MOST])
                raise ValueError(f"watch_modules: no module named {item!r} (modules: {known}, ...)")
            name = item
        else:
            raise TypeError(f"watch_modules: expected module names or modules; got {type(item)}")
        out.append((name or _OUTPUT_SITE, by_name[name]))
    return out


def _fmt(x: float) -> str:
    """4.4e16, 0.031, 2.5: short numbers for messages."""
    if not math.isfinite(x):
        return str(x)
    if x != 0 and not 1e-3 <= abs(x) < 1e4:
        mantissa, exponent = f"{x:.1e}".split("e")
        return f"{mantissa}e{int(exponent)}"
    return f"{x:.3g}"


def _names(names: Sequence[str], at_most: int = _NAMED_AT_MOST) -> str:
    shown = ", ".join(names[:at_most])
    more = len(names) - at_most
    return f"{shown} and {more} more" if more > 0 else shown


def _count(x: float) -> str:
    return f"{int(x):,}" if math.isfinite(x) else "?"


def _site_label(h: MonitorHistory, j: int) -> str:
    kind = h.site_types[j]
    return f"module {h.sites[j]} ({kind})" if kind else h.sites[j]


def _owner(name: str) -> str:
    """The module that owns a parameter: "0" for "0.weight", "(model)" for the root's own."""
    return name.rpartition(".")[0] or "(model)"


def _quiet_median(a: np.ndarray, axis: int | None = None) -> np.ndarray:
    """nanmedian without the all-NaN warning (an all-NaN slice gives NaN)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmedian(a, axis=axis)


# ---------------------------------------------------------------------------- diagnosis


def diagnose_history(h: MonitorHistory, th: MonitorThresholds) -> list[Finding]:
    """Applies the detection rules to a history; findings sorted by step, then cause."""
    findings = [
        *_bad_input(h, th),
        *_nonfinite_gradients(h),
        *_nonfinite_activations(h),
        *_exploding(h, th),
        *_vanishing(h, th),
    ]
    findings = _cross_reference(findings)
    return sorted(findings, key=lambda f: (f.step, CAUSES.index(f.cause)))


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
                f"{_TITLES[first.cause]} came first, at step {first.step}: if the optimizer "
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
            f"Clip the total gradient norm at {_fmt(suggestion)}, the "
            f"{th.clip_percentile:g}th percentile of the healthy total norms of steps "
            f"{max(th.min_history, int(h.steps[0]))}-{onset - 1} (rather than a guess of 1.0 or "
            "5.0): "
            f"gradstats.clip_grad_norm_(model.parameters(), max_norm={_fmt(suggestion)}) before "
            f"optimizer.step(), or gradstats.ClipGradOptimizer(optimizer, max_norm="
            f"{_fmt(suggestion)}, on_nonfinite='skip'). If the norm keeps growing, lower the "
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

    per_param = h.grad_norms[surge.end_row] / _quiet_median(h.grad_norms[surge.base_rows], axis=0)
    per_param = np.where(np.isfinite(per_param), per_param, -np.inf)
    order = [int(j) for j in np.argsort(-per_param, kind="stable") if per_param[j] > -np.inf]
    exploded = [j for j in order if per_param[j] > th.explode_factor]
    where_cols = exploded or order[:_NAMED_AT_MOST]
    where = tuple(h.names[j] for j in where_cols)
    rises = ", ".join(f"{h.names[j]} x{_fmt(per_param[j])}" for j in where_cols[:_NAMED_AT_MOST])
    peak = (
        f"; it peaked at {_fmt(float(total[peak_row]))} at step {int(h.steps[peak_row])}"
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
                f"total gradient norm {_fmt(value)} at step {int(h.steps[i])}, "
                f"{_fmt(value / median)} times its running median {_fmt(median)} (over the "
                f"{before.size} steps before)"
            )
            return _Surge(i, i, np.arange(lo, i), float(value), median, text)
        if value > th.explode_abs_limit:
            text = (
                f"total gradient norm {_fmt(value)} at step {int(h.steps[i])}, above the absolute "
                f"limit {_fmt(th.explode_abs_limit)}"
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
                f"total gradient norm grew {_fmt(seg[-1] / seg[0])}-fold over {span} steps, from "
                f"{_fmt(seg[0])} at step {int(h.steps[start])} to {_fmt(seg[-1])} at step "
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
    described = ", ".join(
        f"{h.names[j]} ({'exactly 0' if j in zero else _fmt(median_ratio[j]) + ' x'})"
        for j in flagged[:_NAMED_AT_MOST]
    )
    if flagged.size > _NAMED_AT_MOST:
        described += f" and {flagged.size - _NAMED_AT_MOST} more"
    top = int(np.argmax(_quiet_median(np.where(finite, norms, np.nan), axis=0)))
    largest_norm = float(_quiet_median(largest[tiny.any(axis=1), 0]))
    message = (
        f"{flagged.size} of {norms.shape[1]} parameters, in layer(s) "
        f"{_names(sorted(layers, key=list(map(_owner, h.names)).index))}, had gradient norms below "
        f"{_fmt(th.vanish_ratio)} x the largest layer's for {th.vanish_steps}+ consecutive steps "
        f"from step {step}: {described}, against {_fmt(largest_norm)} for the largest "
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


def _bad_input(h: MonitorHistory, th: MonitorThresholds) -> list[Finding]:
    """One finding per kind (non-finite, extreme magnitude), at the first step any input had it."""
    events: dict[str, list[tuple[int, int, dict[str, float]]]] = {"nonfinite": [], "extreme": []}
    for j, is_input in enumerate(h.site_is_input):
        if not is_input:
            continue
        nonfinite = h.site_nan[:, j] + h.site_inf[:, j]
        latched = int(h.site_first_nonfinite[j])
        if latched >= 0 and (h.site_steps.size == 0 or latched < h.site_steps[0]):
            events["nonfinite"].append((latched, j, {"nan": math.nan, "inf": math.nan}))
        for row in np.nonzero(nonfinite > 0)[0]:
            events["nonfinite"].append(
                (
                    int(h.site_steps[row]),
                    j,
                    {
                        "nan": float(h.site_nan[row, j]),
                        "inf": float(h.site_inf[row, j]),
                        "max_abs": float(h.site_max_abs[row, j]),
                    },
                )
            )
        seen = np.nonzero(np.isfinite(h.site_max_abs[:, j]))[0]
        for k, row in enumerate(seen):
            value = float(h.site_max_abs[row, j])
            before = h.site_max_abs[seen[max(0, k - th.median_window) : k], j]
            typical = float(np.median(before)) if before.size >= th.min_history else math.nan
            jumped = typical > 0 and value > th.input_jump_factor * typical
            if value > th.input_abs_limit or jumped:
                events["extreme"].append(
                    (int(h.site_steps[row]), j, {"max_abs": value, "typical_max_abs": typical})
                )
    findings = []
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
            evidence = {"nan": nan, "inf": inf, "steps_affected": float(affected)}
            counted = (
                f"{_count(nan)} NaN and {_count(inf)} Inf values"
                if math.isfinite(nan)
                else "NaN/Inf values (before the kept window: counts no longer kept)"
            )
            message = (
                f"{counted} in {_names(where)} at step {step}; {affected} step(s) had NaN/Inf "
                "inputs. Non-finite inputs make the loss and every gradient NaN."
            )
        else:
            j, ev = max(at_step, key=lambda item: item[1]["max_abs"])
            evidence = {
                "max_abs": ev["max_abs"],
                "typical_max_abs": ev["typical_max_abs"],
                "abs_limit": th.input_abs_limit,
                "steps_affected": float(affected),
            }
            typical = (
                f", {_fmt(ev['max_abs'] / ev['typical_max_abs'])} times its typical largest "
                f"value {_fmt(ev['typical_max_abs'])}"
                if math.isfinite(ev["typical_max_abs"]) and ev["typical_max_abs"] > 0
                else ""
            )
            message = (
                f"|x| up to {_fmt(ev['max_abs'])} in {h.sites[j]} at step {step}{typical} "
                f"(limit {_fmt(th.input_abs_limit)}); {affected} step(s) had extreme inputs. "
                "Badly scaled features make activations and gradients overflow."
            )
        findings.append(
            Finding("bad_input", where, step, evidence, message, _BAD_INPUT_ADVICE[kind])
        )
    return findings


def _nonfinite_gradients(h: MonitorHistory) -> list[Finding]:
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
        counted = f"{_count(nan)} NaN and {_count(inf)} Inf gradient values"
    else:
        nan = inf = math.nan
        counted = "NaN/Inf gradient values (before the kept window: counts no longer kept)"
    last = int(h.steps[bad_rows][-1]) if affected else step
    message = (
        f"{counted} at step {step}, in {len(where)} of {len(h.names)} parameters "
        f"({_names(where)}); {affected} of the "
        f"{h.steps.size} kept steps had NaN/Inf gradients (last at step {last})."
    )
    evidence = {"nan": nan, "inf": inf, "steps_affected": float(affected), "last_step": float(last)}
    advice = (
        "Keep such steps from reaching the weights: gradstats.ClipGradOptimizer(optimizer, "
        "max_norm=..., on_nonfinite='skip') or clip_grad_norm_(..., on_nonfinite='skip'). Then "
        "remove the source: see the other findings (bad input, exploding gradients) and check the "
        "loss for log(0) or division by zero. With float16, use torch.amp.GradScaler or bfloat16."
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
            labels = _names([_site_label(h, j) for j in columns])
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
    for row in range(h.site_steps.size):
        order = h.site_order[row]
        seen = np.nonzero(order >= 0)[0]
        if seen.size == 0:
            continue
        first = int(seen[np.argmin(order[seen])])
        if is_input[first]:
            continue
        step = int(h.site_steps[row])
        site = h.sites[first]
        ranked = seen[np.argsort(order[seen], kind="stable")]
        later = [_site_label(h, j) for j in ranked if j != first]
        nan, inf = float(h.site_nan[row, first]), float(h.site_inf[row, first])
        message = (
            f"the output of {_site_label(h, first)} held {_count(nan)} NaN and {_count(inf)} Inf "
            f"values at step {step} "
            f"from finite inputs: the first watched module to produce them in that forward pass"
            + (f" (then {_names(later)})." if later else ".")
        )
        evidence = {"nan": nan, "inf": inf, "max_abs": float(h.site_max_abs[row, first])}
        return [
            Finding(
                "nonfinite_activations",
                (site,),
                step,
                evidence,
                message,
                advice_for.format(m=_site_label(h, first)),
            )
        ]
    return []


def format_report(h: MonitorHistory, findings: list[Finding]) -> str:
    """The text of GradMonitor.report()."""
    width = 100
    total = h.total_norm[np.isfinite(h.total_norm)]
    if h.steps.size:
        norms = (
            f"total gradient norm median {_fmt(float(np.median(total)))}, "
            f"max {_fmt(float(total.max()))}"
            if total.size
            else "no finite total gradient norm"
        )
        head = (
            f"GradMonitor: {h.steps.size} steps kept (steps {int(h.steps[0])}-"
            f"{int(h.steps[-1])}), {len(h.names)} parameters, {len(h.sites)} watched "
            f"inputs/outputs; {norms}."
        )
    else:
        head = f"GradMonitor: no step recorded yet; {len(h.sites)} watched inputs/outputs."
    lines = [head]
    if not findings:
        lines.append(
            "No problem found: no NaN/Inf in gradients or watched tensors, no exploding or "
            "vanishing gradients, no extreme inputs."
        )
        return "\n".join(lines)
    lines.append(f"{len(findings)} finding(s), oldest first:")
    for i, f in enumerate(findings, 1):
        lines.append("")
        where = _names(f.where, _TITLE_NAMES)
        if f.cause == "nonfinite_activations":
            where = f"module {where}"
        lines.append(f"{i}. {_TITLES[f.cause]} at step {f.step}, in {where}")
        lines.append(textwrap.fill(f.message, width, initial_indent="   ", subsequent_indent="   "))
        lines.append(
            textwrap.fill(
                f"What to do: {f.advice}", width, initial_indent="   ", subsequent_indent="   "
            )
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------------- plot


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
        axes.axhline(threshold, color="orange", linestyle="--", label=f"clip at {_fmt(threshold)}")
    if clipped.any():
        axes.plot(steps[clipped], total[clipped], "o", mfc="none", color="orange", label="clipped")
    bad = ~np.isfinite(total) | ((h.grad_nan + h.grad_inf).sum(axis=1) > 0)
    _mark_steps(axes, steps[bad], _PLOT_MARK_HIGH, "x", "red", "NaN/Inf gradients")
    _mark_steps(axes, steps[h.skipped == 1], _PLOT_MARK_LOW, "v", "purple", "skipped")
    _headroom(axes)
    axes.set_ylabel(f"total grad norm (L{_fmt(h.norm_type)})")


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
