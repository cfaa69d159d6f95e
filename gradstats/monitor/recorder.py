"""GradMonitor: says why NaNs appear (exploding gradients, vanishing gradients, bad input data).

Each monitor.step() copies the per-parameter gradient norms and NaN/Inf counts of one fused pass
into ring buffers on the device; forward hooks do the same, with the same fused op, for the model's
inputs and optionally for module outputs (NaN/Inf counts and the largest finite magnitude). Nothing
is read back to the host until history(), diagnose(), report(), scalars() or plot() is called, so
watching a run adds no host synchronisation to a training step.
"""

from __future__ import annotations

import math
import warnings
import weakref
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from gradstats import ops
from gradstats._core import (
    INF_ROW,
    NAN_ROW,
    GradStats,
    check_int,
    check_max_norm,
    check_norm_type,
    local_stats,
)
from gradstats.distributed import statistics
from gradstats.monitor.flight import (
    FlightRecorder,
)
from gradstats.monitor.history import (
    MonitorThresholds,
    resolve_thresholds,
)
from gradstats.monitor.reader import MonitorReader
from gradstats.monitor.report import listed
from gradstats.monitor.rings import (
    GRAD_SCALARS,
    FeatureRing,
    GradRing,
    IndexCache,
    SiteRing,
    grad_placement,
    normal_tensors,
)
from gradstats.monitor.watch import (
    INPUT_SITE,
    MAX_FEATURES,
    MAX_SITES,
    Notes,
    WatchModules,
    check_feature_dim,
    dense_values,
    failed,
    feature_dim,
    floating_leaves,
    readable_parts,
    resolve_modules,
)

# Steps of gradient statistics the flight recorder keeps up to its trigger (at most half the
# window: it copies them every half window, before the ring overwrites them).
FLIGHT_STEPS = 64


class GradMonitor(MonitorReader):
    """Watches gradients, inputs and activations on the device and says why NaNs appear.

    Call monitor.step() after each backward (or give the monitor to ClipGradOptimizer, which calls
    monitor.step(stats=..., params=...) with the statistics it computed anyway). Then
    monitor.report() names the cause (exploding gradients, vanishing gradients, bad input data),
    where and when, with the evidence and what to do.

    Args:
        model: the module whose parameters (named by model.named_parameters()) are watched.
        window: steps kept in the ring buffers (on the device).
        watch_inputs: count NaN/Inf and track the largest magnitude of the model's floating-point
            inputs, named "input[i]" (positional) and "input[name]" (keyword), and per feature
            their scale, range and NaN/Inf counts (see feature_dim).
        watch_modules: None, "all" (every leaf module) or module names / modules whose outputs are
            watched the same way; the first of them whose output holds NaN/Inf is named.
        norm_type: norm of the per-parameter gradient norms, when step() computes them itself.
        max_norm: the clip threshold in use, drawn on the plot (else inferred from clipped steps).
        thresholds: the detection thresholds (MonitorThresholds; its defaults when None).
        feature_dim: the inputs' feature dimension: "auto" (the last of [batch, features] and
            [batch, time, features], the channels of [N, C, H, W] and [N, C, D, H, W]), an int for
            every input, or None (no per-feature statistics).
        dump_dir: where the flight record (monitor.dump) is written by itself once a NaN/Inf or an
            exploding step was seen, at the first read-back after it (history, diagnose, report,
            scalars, plot), at close() and at exit; the report names the file, and so does
            monitor.dumped (None until then). A write that fails warns once, is named in the
            report and is not tried again; it never leaves a partial file.

    The thresholds used to be keyword arguments of their own (explode_factor=..., ...); those
    still work, with a DeprecationWarning.
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
        thresholds: MonitorThresholds | None = None,
        feature_dim: int | str | None = "auto",
        dump_dir: str | Path | None = None,
        **deprecated: float,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"GradMonitor: model must be a torch.nn.Module; got {type(model)}")
        check_int("window", window, 2)
        self.norm_type = check_norm_type(norm_type)
        if max_norm is not None and not check_max_norm(max_norm) > 0:
            raise ValueError(f"GradMonitor: max_norm must be positive (or None); got {max_norm!r}")
        self.thresholds = resolve_thresholds(thresholds, deprecated)
        self._feature_dim = check_feature_dim(feature_dim)
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError("GradMonitor: the model has no parameter that requires grad")

        self.window = window
        self.max_norm = None if max_norm is None else float(max_norm)
        self.dump_dir = None if dump_dir is None else Path(dump_dir)
        self.dumped: Path | None = None
        self._dump_failed: str | None = None
        self.names = tuple(n for n, _ in named)
        self._params = [p for _, p in named]
        self._column = {id(p): i for i, p in enumerate(self._params)}
        self._step = 0
        self._call = 0
        self._device: torch.device | None = None
        self._index: IndexCache | None = None
        self._grads: GradRing | None = None
        self._sites: SiteRing | None = None
        self._features: dict[str, FeatureRing] = {}
        self._flight: FlightRecorder | None = None
        self._site_index: dict[str, int] = {}
        self._site_is_input: list[bool] = []
        self._site_types: dict[str, str] = {}
        self._notes = Notes()
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        if watch_inputs:
            self._handles.append(model.register_forward_pre_hook(self._on_input, with_kwargs=True))
        for name, module in resolve_modules(model, watch_modules):
            self._site_types[name] = type(module).__name__
            self._handles.append(module.register_forward_hook(partial(self._on_output, name)))
        if self.dump_dir is not None:
            weakref.finalize(self, GradMonitor._dump_at_exit, weakref.ref(self))

    # ----------------------------------------------------------------- recording (no host sync)

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
            try:
                self._set_device()
                if self._grads is None:
                    with normal_tensors():
                        self._grads = GradRing(len(self._params), self.window, self._device)
                        self._flight = FlightRecorder(
                            min(FLIGHT_STEPS, self.window // 2), self._device
                        )
                elif self._step % self.window == 0:
                    self._grads.fold(self._step)
                self._record_grads(params_list, stats, skipped)
            except Exception as exc:  # the monitor must never make the user's step fail
                self._notes.add("step()", failed(exc))
        self._step += 1
        self._call = 0
        try:
            with torch.no_grad():
                if self._step % (self.window // 2) == 0 and self._flight is not None:
                    self._check_flight()
                if self._sites is not None:
                    self._sites.start(self._step)
                for ring in self._features.values():
                    ring.start(self._step)
        except Exception as exc:  # the monitor must never make the user's step fail
            self._notes.add("step()", failed(exc))

    def _record_grads(
        self, params: list[Tensor], stats: GradStats, skipped: Tensor | bool | None
    ) -> None:
        ring = self._grads
        counts = self._here(stats.counts)
        parts = [
            self._here(stats.norms),
            counts[NAN_ROW, :-1],
            counts[INF_ROW, :-1],
            self._here(stats.total_norm).reshape(1),
            ring.constants["one"]
            if stats.clip_coef is None
            else self._here(stats.clip_coef).reshape(1),
            self._skipped_value(skipped),
        ]
        row = ring.row(self._step)
        if len(params) == len(self._params) and all(a is b for a, b in zip(params, self._params)):
            # cat casts each part straight into the float64 row: counts stay exact.
            torch.cat(parts, out=row)
            return
        positions, keep, strangers = grad_placement(
            params, self._column, len(self._params), self._index
        )
        if strangers:
            warnings.warn(
                f"GradMonitor.step(): {len(strangers)} of the {len(params)} parameters given "
                f"(shapes {listed([str(tuple(p.shape)) for p in strangers])}) are not parameters "
                "of the monitored model that require grad; their statistics are not recorded",
                stacklevel=4,
            )
        values = torch.empty(
            3 * len(params) + GRAD_SCALARS, dtype=torch.float64, device=self._device
        )
        torch.cat(parts, out=values)
        if keep is not None:
            values = values.index_select(0, keep)
        row.copy_(ring.blank).index_copy_(0, positions, values)

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
            grads = [dense_values(p.grad.detach()) for p in with_grad]
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
        constants = self._grads.constants
        if skipped is None:
            return constants["nan"]
        if isinstance(skipped, Tensor):
            return self._here(skipped).reshape(1)
        return constants["one" if skipped else "zero"]

    def _set_device(self) -> None:
        """The rings live with the model's (first) parameter, where the gradients are: chosen at the
        first observation, so that model.to(device) after creating the monitor is fine."""
        if self._device is None:
            self._device = self._params[0].device
            self._index = IndexCache(self._device)

    def _here(self, t: Tensor) -> Tensor:
        if t.device == self._device:
            return t
        return t.to(self._device, non_blocking=self._device.type == "cuda")

    def _on_input(self, module: nn.Module | None, args: tuple, kwargs: dict) -> None:
        try:
            leaves: list[tuple[str, Tensor]] = []
            unread: list[tuple[str, str]] = []
            for i, arg in enumerate(args):
                floating_leaves(f"{INPUT_SITE}[{i}]", arg, leaves, unread)
            for key, arg in kwargs.items():
                floating_leaves(f"{INPUT_SITE}[{key}]", arg, leaves, unread)
            self._watch(leaves, unread, is_input=True)
        except Exception as exc:  # the monitor must never make the user's forward fail
            self._notes.add(INPUT_SITE, failed(exc))

    def _on_output(self, name: str, module: nn.Module, args: tuple, output: Any) -> None:
        try:
            leaves: list[tuple[str, Tensor]] = []
            unread: list[tuple[str, str]] = []
            floating_leaves(name, output, leaves, unread)
            self._watch(leaves, unread, is_input=False)
        except Exception as exc:  # the monitor must never make the user's forward fail
            self._notes.add(name, failed(exc))

    def _watch(
        self, leaves: list[tuple[str, Tensor]], unread: list[tuple[str, str]], is_input: bool
    ) -> None:
        for name, why in unread:
            self._notes.add(name, why)
        names: list[str] = []
        tensors: list[Tensor] = []
        for name, leaf in leaves:
            parts, why = readable_parts(leaf)
            if why is not None:
                self._notes.add(name, f"not watched: {why}")
            if is_input and len(parts) == 1 and self._observe_features(name, parts[0]):
                continue
            names += [name] * len(parts)
            tensors += parts
        if tensors:
            self._observe(tuple(names), tensors, is_input)

    def _observe_features(self, name: str, t: Tensor) -> bool:
        """Per-feature statistics of an input, which also give its NaN/Inf counts and largest |x|
        (one pass); False when they do not apply to it."""
        dim = feature_dim(t, self._feature_dim)
        if dim is None:
            return False
        ring = self._features.get(name)
        features = t.shape[dim]
        if features > MAX_FEATURES or (ring is not None and ring.features != features):
            why = f"{features} features" + (
                f" (more than {MAX_FEATURES})"
                if features > MAX_FEATURES
                else f", not {ring.features}"
            )
            self._notes.add(name, f"per-feature statistics not computed: {why}")
            return False
        with torch.no_grad():
            stats = ops.feature_stats(t, dim)
            self._set_device()
            if ring is None:
                if self._site_columns((name,), is_input=True) is None:
                    return True
                with normal_tensors():
                    ring = FeatureRing(self.window, self._device, features, dim % t.dim(), t.dim())
                self._features[name] = ring
            ring.record(self._step, self._here(stats))
        return True

    def _observe(self, names: tuple[str, ...], tensors: list[Tensor], is_input: bool) -> None:
        """NaN/Inf counts and largest finite |x| of the tensors, accumulated into this step's row
        (several forwards in one step add up), and whether this call saw NaN/Inf."""
        with torch.no_grad():  # which also makes detaching the tensors needless
            # This process's own statistics: a hook runs no collective, even for DTensors.
            st = local_stats(tensors, math.inf, math.inf, "zero")
            norms, counts = st.norms, st.counts
            self._set_device()
            columns = self._site_columns(names, is_input)
            if columns is None:
                return
            self._sites.record(
                self._step, self._call, columns, self._here(norms), self._here(counts)
            )
        self._call += 1

    def _site_columns(self, names: tuple[str, ...], is_input: bool) -> Tensor | None:
        """The site columns of a call's tensors (None: a site too many, not watched)."""
        key = ("site", *names)
        index = self._index.get(key)
        if index is None:
            fresh = [name for name in dict.fromkeys(names) if name not in self._site_index]
            if len(self._site_index) + len(fresh) > MAX_SITES:
                for name in fresh:
                    self._notes.add(name, f"not watched: more than {MAX_SITES} inputs and outputs")
                return None
            for name in fresh:
                self._site_index[name] = len(self._site_index)
                self._site_is_input.append(is_input)
            with normal_tensors():
                if self._sites is None:
                    self._sites = SiteRing(self.window, self._device, len(self._site_index))
                else:
                    self._sites.grow(len(self._site_index))
            index = self._index.make(key, [self._site_index[n] for n in names])
        return index

    def _check_flight(self) -> None:
        """Every half window, on the device: the flight recorder's check (flight.py)."""
        feature_rings = list(self._features.items())
        sources = {"grads": self._grads.ring}
        if self._sites is not None:
            sources["site_counts"] = self._sites.counts
            sources["site_max"] = self._sites.max_abs
        sources.update({f"features:{site}": ring.ring for site, ring in feature_rings})
        self._flight.check(
            self._step,
            len(self._params),
            sources,
            [r.ring for _, r in feature_rings],
            self.thresholds,
        )

    # ---------------------------------------------------------------------------- hooks

    def watch_inputs(self, *args: Any, **kwargs: Any) -> None:
        """Records args and kwargs as this step's model inputs, as the forward pre-hook does with
        the model's own arguments: for loops whose step never calls the model's forward with the
        batch (a Lightning training_step that calls submodules). Never raises."""
        self._on_input(None, args, kwargs)

    def close(self) -> None:
        """Removes the forward hooks (and writes the flight record, with dump_dir). What was
        recorded stays readable."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        if self.dump_dir is not None:
            self.history()

    @property
    def device(self) -> torch.device | None:
        """Where the buffers live: the device of the model's first parameter at the first
        observation (None before it)."""
        return self._device

    @property
    def watching(self) -> bool:
        """Whether the forward hooks are installed (False after close())."""
        return bool(self._handles)

    def __enter__(self) -> GradMonitor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"GradMonitor({len(self.names)} parameters, {len(self._site_index)} watched "
            f"inputs/outputs, {self._step} steps, window={self.window}, "
            f"hooks={'on' if self._handles else 'off'})"
        )
