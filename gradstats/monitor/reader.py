"""Reading a GradMonitor back: history, diagnosis, report, scalars, plot and the flight record.

Every method here copies the buffers to the host once (the only host synchronisation the monitor
makes); recording (recorder.py) never does.
"""

from __future__ import annotations

import contextlib
import math
import warnings
import weakref
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from gradstats import ops
from gradstats._files import failure
from gradstats.monitor.diagnose import diagnose_history
from gradstats.monitor.flight import (
    TRIGGERS,
    FlightRecord,
    record_from_history,
    tables,
    write_dump,
)
from gradstats.monitor.history import Finding, MonitorHistory
from gradstats.monitor.plot import save_plot
from gradstats.monitor.readback import Layout, build_history, to_host
from gradstats.monitor.report import format_report
from gradstats.monitor.rings import NEVER, kept_steps, site_kept_steps

# A failed automatic dump is reported at the user's call: report() -> history() -> _auto_dump.
_WARN_FROM_READ_BACK = 4


class MonitorReader:
    """The reading half of GradMonitor, over the buffers its recording half (recorder.py) keeps:
    _grads, _sites, _features, _flight, _index, the names and sites, thresholds, dump_dir, dumped
    and _dump_failed (why the automatic dump could not be written, or None)."""

    def _buffers(self) -> list[Tensor]:
        out = self._grads.buffers() if self._grads else []
        out += self._sites.buffers() if self._sites else []
        for ring in self._features.values():
            out += ring.buffers()
        return out + (self._flight.buffers() if self._flight else [])

    @property
    def memory_bytes(self) -> int:
        """Bytes held by the monitor's buffers (on self.device): bounded by the window, the
        parameters and the watched inputs and outputs, however many forwards run between steps."""
        index = self._index.nbytes() if self._index else 0
        return index + sum(b.numel() * b.element_size() for b in self._buffers())

    def _layout(self) -> Layout:
        return Layout(
            names=self.names,
            param_ndims=tuple(p.dim() for p in self._params),
            norm_type=self.norm_type,
            sites=tuple(self._site_index),
            site_is_input=tuple(self._site_is_input),
            site_types=tuple(self._site_types.get(name, "") for name in self._site_index),
            feature_dims={site: (ring.dim, ring.ndim) for site, ring in self._features.items()},
            unwatched=self._notes.lines(),
        )

    def _read(self) -> tuple[MonitorHistory, FlightRecord | None]:
        """The rings and the flight recorder on the host (one device-to-host copy)."""
        parts = iter(to_host(self._buffers()))
        w = self.window
        steps, site_steps = kept_steps(self._step, w), site_kept_steps(self._step, w)
        grad_rows = grad_first = sites = None
        if self._grads is not None:
            ring, grad_first = next(parts), next(parts)
            grad_rows = ring[steps % w]
        if self._sites is not None:
            counts, max_abs, first_call, first = (next(parts) for _ in range(4))
            rows = site_steps % w
            sites = (counts[rows], max_abs[rows], first_call[rows], first)
        features = {}
        for site in self._features:
            ring, first = next(parts), next(parts)
            features[site] = (ring[site_steps % w], first)
        h = build_history(self._layout(), steps, grad_rows, grad_first, site_steps, sites, features)
        if self._flight is None:
            return h, None
        trip, reason = int(next(parts)), int(next(parts))
        if trip >= NEVER:
            return h, record_from_history(h, self.thresholds, self._flight.steps)
        copies = dict(zip(self._flight.copies, parts))
        return h, self._kept_record(trip, TRIGGERS[reason], copies)

    def _kept_record(self, trip: int, reason: str, copies: dict[str, np.ndarray]) -> FlightRecord:
        """The flight recorder's copies as a record (the rows of steps trip - N + 1 ... trip)."""
        steps = np.arange(trip - self._flight.steps + 1, trip + 1)
        valid = steps >= 0
        site_copies = None
        if "site_counts" in copies:
            site_copies = (copies["site_counts"][valid], copies["site_max"][valid], None, None)
        features = {
            site: (copies[f"features:{site}"][valid], None)
            for site in self._features
            if f"features:{site}" in copies
        }
        h = build_history(
            self._layout(),
            steps[valid],
            copies["grads"][valid],
            None,
            steps[valid],
            site_copies,
            features,
        )
        rows = np.arange(h.steps.size)
        return FlightRecord(trip, reason, h.steps.tolist(), tables(h, rows, rows[-1:]))

    def history(self) -> MonitorHistory:
        """The ring buffers on the host, oldest step first (one device-to-host copy)."""
        h, record = self._read()
        self._auto_dump(h, record)
        return h

    def _auto_dump(self, h: MonitorHistory, record: FlightRecord | None) -> None:
        """Writes the flight record to dump_dir once. A write that fails (a full disk, a read-only
        mount, a file where the folder should be) must not fail the read-back that triggered it,
        at the very step the monitor exists for: it is said once, in a warning and in the report,
        and not tried again."""
        done = self.dumped is not None or self._dump_failed is not None
        if self.dump_dir is None or record is None or done:
            return
        path = self.dump_dir / f"gradmonitor_step{record.step}.json"
        findings = diagnose_history(h, self.thresholds)
        target = path
        try:
            self.dumped = write_dump(path, record, h, findings, format_report(h, findings))
            target = path.with_suffix(".png")
            self._write_plot(target, h, findings)
        except Exception as exc:  # the monitor goes on without its file
            self._dump_failed = f"{target} ({failure(exc)})"
            warnings.warn(
                f"GradMonitor: the flight record could not be written: {self._dump_failed}. The "
                "monitor goes on without it and does not try again; monitor.dump(path) writes it "
                "elsewhere.",
                RuntimeWarning,
                stacklevel=_WARN_FROM_READ_BACK,
            )

    def _write(self, path: Path, h: MonitorHistory, record: FlightRecord | None) -> Path:
        findings = diagnose_history(h, self.thresholds)
        written = write_dump(path, record, h, findings, format_report(h, findings))
        self._write_plot(written.with_suffix(".png"), h, findings)
        return written

    def _write_plot(self, path: Path, h: MonitorHistory, findings: list[Finding]) -> None:
        if h.steps.size:
            # The plot is optional: without matplotlib the JSON is the record.
            with contextlib.suppress(ImportError):
                save_plot(path, h, findings, self.max_norm, self.thresholds, None)

    def dump(self, path: str | Path) -> Path:
        """Writes the flight record as JSON to path: the trigger (the first step whose gradients,
        inputs or watched outputs held NaN/Inf, or whose total norm exploded), the gradient,
        input and output statistics of the steps up to it, that step's per-feature input
        statistics, the findings and the report; and the plot next to it (.png) when matplotlib
        is installed. With no trigger yet, the findings and the report only. NaN and Inf are
        written as Python's json writes them (NaN, Infinity). One device-to-host copy."""
        h, record = self._read()
        return self._write(Path(path), h, record)

    @staticmethod
    def _dump_at_exit(ref: weakref.ref) -> None:
        monitor = ref()
        if monitor is not None and monitor.dumped is None:
            # At exit nothing can be done about a failed dump.
            with contextlib.suppress(Exception):
                monitor.history()

    def diagnose(self) -> list[Finding]:
        """The problems seen in the kept steps (NaN/Inf first seen: over the whole run), oldest
        first. Healthy training gives an empty list. One device-to-host copy."""
        return diagnose_history(self.history(), self.thresholds)

    def report(self) -> str:
        """What went wrong, where, when, the evidence and what to do, as text for a person."""
        h = self.history()
        text = format_report(h, diagnose_history(h, self.thresholds))
        if self.dumped is not None:
            text += f"\n\nFlight record (the steps that led there): {self.dumped}"
        if self._dump_failed is not None:
            text += f"\n\nFlight record not written: {self._dump_failed}"
        return text

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
            max_abs = self._sites.max_abs[slot, :m].to(torch.float64)
            nonfinite = self._sites.counts[slot, :, :m].sum(0).to(torch.float64)
            for site, ring in self._features.items():
                j, stats = self._site_index[site], ring.ring[slot]
                max_abs[j] = stats[ops.FEATURE_EXTREME_ROWS].amax()
                nonfinite[j] = stats[ops.FEATURE_NONFINITE_ROWS].sum()
            parts += [max_abs, nonfinite]
        if self._flight is not None:
            parts.append(self._flight.step.reshape(1).to(torch.float64))
        values = torch.cat(parts).tolist()
        out = {
            f"{prefix}total_norm": values[0],
            f"{prefix}clip_coef": values[1],
            f"{prefix}nonfinite_grads": values[2],
        }
        out.update({f"{prefix}grad_norm/{k}": v for k, v in zip(self.names, values[3 : 3 + n])})
        site_values = values[3 + n : 3 + n + 2 * m]
        for i, site in enumerate(self._site_index):
            if site_values[i] != -math.inf:  # not observed in that step
                out[f"{prefix}max_abs/{site}"] = site_values[i]
                out[f"{prefix}nonfinite/{site}"] = site_values[m + i]
        tripped = self._flight is not None and values[-1] < NEVER
        bad = out[f"{prefix}nonfinite_grads"] > 0 or any(site_values[m:])
        if self.dump_dir is not None and self.dumped is None and (tripped or bad):
            self.history()  # finds the trigger and writes the flight record
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
