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
import warnings
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from gradstats import ops
from gradstats._core import INF_ROW, NAN_ROW, GradStats, check_int, check_norm_type
from gradstats.distributed import statistics
from gradstats.monitor.diagnose import diagnose_history
from gradstats.monitor.history import Finding, MonitorHistory, MonitorThresholds
from gradstats.monitor.plot import save_plot
from gradstats.monitor.report import format_report, listed
from gradstats.monitor.rings import (
    GRAD_SCALARS,
    NEVER,
    GradRing,
    SiteRing,
    first_step,
    forward_order,
    kept_steps,
    normal_tensors,
    site_kept_steps,
)
from gradstats.monitor.watch import (
    INPUT_SITE,
    MAX_SITES,
    Notes,
    WatchModules,
    dense_values,
    floating_leaves,
    readable_parts,
    resolve_modules,
)

# Cached column index tensors per parameter list (a list that changes every step must not grow it).
_INDEX_CACHE_SIZE = 64
# An error caught in a hook is quoted up to this many characters in the report.
_ERROR_CHARS = 160
_THRESHOLD_NAMES = tuple(f.name for f in dataclasses.fields(MonitorThresholds))


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
        thresholds: the detection thresholds (MonitorThresholds; its defaults when None).

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
        **deprecated: float,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"GradMonitor: model must be a torch.nn.Module; got {type(model)}")
        check_int("window", window, 2)
        self.norm_type = check_norm_type(norm_type)
        if max_norm is not None and not float(max_norm) > 0:
            raise ValueError(f"max_norm must be a positive number or None; got {max_norm!r}")
        self.thresholds = _thresholds(thresholds, deprecated)
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError("GradMonitor: the model has no parameter that requires grad")

        self.window = window
        self.max_norm = None if max_norm is None else float(max_norm)
        self.names = tuple(n for n, _ in named)
        self._params = [p for _, p in named]
        self._column = {id(p): i for i, p in enumerate(self._params)}
        self._step = 0
        self._call = 0
        self._device: torch.device | None = None
        self._grads: GradRing | None = None
        self._sites: SiteRing | None = None
        self._site_index: dict[str, int] = {}
        self._site_is_input: list[bool] = []
        self._site_types: dict[str, str] = {}
        self._index_cache: dict[tuple, Tensor] = {}
        self._placements: dict[tuple, tuple[Tensor, Tensor | None]] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._notes = Notes()
        if watch_inputs:
            self._handles.append(model.register_forward_pre_hook(self._on_input, with_kwargs=True))
        for name, module in resolve_modules(model, watch_modules):
            self._site_types[name] = type(module).__name__
            self._handles.append(module.register_forward_hook(partial(self._on_output, name)))

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
                elif self._step % self.window == 0:
                    self._grads.fold(self._step)
                self._record_grads(params_list, stats, skipped)
            except Exception as exc:  # the monitor must never make the user's step fail
                self._notes.add("step()", _failed(exc))
        self._step += 1
        self._call = 0
        if self._sites is not None:
            self._sites.start(self._step)

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
        placement = self._grad_positions(params)
        if placement is None:
            # cat casts each part straight into the float64 row: counts stay exact.
            torch.cat(parts, out=row)
            return
        positions, keep = placement
        size = 3 * len(params) + GRAD_SCALARS
        values = torch.empty(size, dtype=torch.float64, device=self._device)
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
            tail = [3 * n + j for j in range(GRAD_SCALARS)]
            layout = columns + [n + c for c in columns] + [2 * n + c for c in columns] + tail
            keep = None
            if len(known) < k:
                strangers = [tuple(p.shape) for p in params if id(p) not in self._column]
                warnings.warn(
                    f"GradMonitor.step(): {len(strangers)} of the {k} parameters given (shapes "
                    f"{listed([str(s) for s in strangers])}) are not parameters of the "
                    "monitored model that require grad; their statistics are not recorded",
                    stacklevel=4,
                )
                rows = [i for i, _ in known]
                slots = rows + [k + i for i in rows] + [2 * k + i for i in rows]
                scalars = [3 * k + j for j in range(GRAD_SCALARS)]
                keep = self._new_index(("keep", *key), slots + scalars)
            cached = (self._new_index(key, layout), keep)
            if len(self._placements) >= _INDEX_CACHE_SIZE:
                self._placements.clear()
            self._placements[key] = cached
        return cached

    def _new_index(self, key: tuple, values: list[int]) -> Tensor:
        if len(self._index_cache) >= _INDEX_CACHE_SIZE:
            self._index_cache.clear()
        with normal_tensors():
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

    def _on_input(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        try:
            leaves: list[tuple[str, Tensor]] = []
            for i, arg in enumerate(args):
                floating_leaves(f"{INPUT_SITE}[{i}]", arg, leaves)
            for key, arg in kwargs.items():
                floating_leaves(f"{INPUT_SITE}[{key}]", arg, leaves)
            self._watch(leaves, is_input=True)
        except Exception as exc:  # the monitor must never make the user's forward fail
            self._notes.add(INPUT_SITE, _failed(exc))

    def _on_output(self, name: str, module: nn.Module, args: tuple, output: Any) -> None:
        try:
            leaves: list[tuple[str, Tensor]] = []
            floating_leaves(name, output, leaves)
            self._watch(leaves, is_input=False)
        except Exception as exc:  # the monitor must never make the user's forward fail
            self._notes.add(name, _failed(exc))

    def _watch(self, leaves: list[tuple[str, Tensor]], is_input: bool) -> None:
        names: list[str] = []
        tensors: list[Tensor] = []
        for name, leaf in leaves:
            parts, why = readable_parts(leaf)
            if why is not None:
                self._notes.add(name, f"not watched: {why}")
            names += [name] * len(parts)
            tensors += parts
        if tensors:
            self._observe(tuple(names), tensors, is_input)

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
        index = self._index_cache.get(key)
        if index is None:
            fresh = [name for name in dict.fromkeys(names) if name not in self._site_index]
            if len(self._site_index) + len(fresh) > MAX_SITES:
                for name in fresh:
                    self._notes.add(name, f"not watched: more than {MAX_SITES} inputs and outputs")
                return None
            for name in fresh:
                if name not in self._site_index:
                    self._site_index[name] = len(self._site_index)
                    self._site_is_input.append(is_input)
            with normal_tensors():
                if self._sites is None:
                    self._sites = SiteRing(self.window, self._device, len(self._site_index))
                else:
                    self._sites.grow(len(self._site_index))
            index = self._new_index(key, [self._site_index[n] for n in names])
        return index

    # ---------------------------------------------------------------------------- hooks

    def close(self) -> None:
        """Removes the forward hooks. What was recorded stays readable."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

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

    # ---------------------------------------------------------------- reading (one sync each)

    def _buffers(self) -> list[Tensor]:
        return (self._grads.buffers() if self._grads else []) + (
            self._sites.buffers() if self._sites else []
        )

    @property
    def memory_bytes(self) -> int:
        """Bytes held by the monitor's buffers (on self.device): bounded by the window, the
        parameters and the watched inputs and outputs, however many forwards run between steps."""
        return sum(b.numel() * b.element_size() for b in self._buffers()) + sum(
            t.numel() * t.element_size() for t in self._index_cache.values()
        )

    def history(self) -> MonitorHistory:
        """The ring buffers on the host, oldest step first (one device-to-host copy)."""
        parts = _to_host(self._buffers())
        w, n, m = self.window, len(self.names), len(self._site_index)
        if self._grads is None:
            ring, grad_first = np.zeros((w, 3 * n + GRAD_SCALARS)), np.full(n, float(NEVER))
        else:
            ring, grad_first = parts[:2]
        steps = kept_steps(self._step, w)
        rows = ring[steps % w]
        grad_nan, grad_inf = rows[:, n : 2 * n], rows[:, 2 * n : 3 * n]

        site_steps = site_kept_steps(self._step, w)
        site_rows = site_steps % w
        if self._sites is None:
            counts, max_abs = np.zeros((w, 2, 0)), np.zeros((w, 0))
            site_first = np.zeros(0)
            order = np.zeros((site_steps.size, 0), dtype=np.int64)
        else:
            counts, max_abs, first_call, site_first = parts[-4:]
            order = forward_order(first_call[site_rows, :m])
        site_nan, site_inf = counts[site_rows, 0, :m], counts[site_rows, 1, :m]
        max_abs = max_abs[site_rows, :m]
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
            grad_first_nonfinite=first_step(grad_first, grad_nan + grad_inf, steps),
            sites=tuple(self._site_index),
            site_is_input=tuple(self._site_is_input),
            site_types=tuple(self._site_types.get(name, "") for name in self._site_index),
            site_steps=site_steps,
            site_max_abs=np.where(np.isneginf(max_abs), np.nan, max_abs),
            site_nan=site_nan,
            site_inf=site_inf,
            site_order=order,
            site_first_nonfinite=first_step(site_first[:m], site_nan + site_inf, site_steps),
            unwatched=self._notes.lines(),
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
        n, m = len(self.names), len(self._site_index)
        row = self._grads.ring[slot]
        parts = [row[3 * n : 3 * n + 2], row[n : 3 * n].sum().reshape(1), row[:n]]
        if m:
            parts += [
                self._sites.max_abs[slot, :m].to(torch.float64),
                self._sites.counts[slot, :, :m].sum(0).to(torch.float64),
            ]
        values = torch.cat(parts).tolist()
        out = {
            f"{prefix}total_norm": values[0],
            f"{prefix}clip_coef": values[1],
            f"{prefix}nonfinite_grads": values[2],
        }
        out.update({f"{prefix}grad_norm/{k}": v for k, v in zip(self.names, values[3 : 3 + n])})
        site_values = values[3 + n :]
        for i, site in enumerate(self._site_index):
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
        h = self.history()
        if h.steps.size == 0:
            raise RuntimeError("GradMonitor.plot(): no step recorded yet; call monitor.step()")
        findings = diagnose_history(h, self.thresholds)
        return save_plot(path, h, findings, self.max_norm, self.thresholds, title)


def _thresholds(given: MonitorThresholds | None, deprecated: dict[str, float]) -> MonitorThresholds:
    """The thresholds from thresholds= and the deprecated keyword arguments (which win)."""
    unknown = sorted(set(deprecated) - set(_THRESHOLD_NAMES))
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


def _failed(exc: Exception) -> str:
    """A note for an error a hook caught: its type and first line, shortened."""
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    if len(first) > _ERROR_CHARS:
        first = first[:_ERROR_CHARS] + "..."
    return f"the monitor's hook failed ({type(exc).__name__}: {first}); the call was not recorded"


def _to_host(buffers: list[Tensor]) -> list[np.ndarray]:
    """The buffers as float64 numpy arrays, in one device-to-host copy."""
    if not buffers:
        return []
    flat = torch.cat([b.reshape(-1).to(torch.float64) for b in buffers]).cpu().numpy()
    parts, at = [], 0
    for b in buffers:
        parts.append(flat[at : at + b.numel()].reshape(tuple(b.shape)))
        at += b.numel()
    return parts
