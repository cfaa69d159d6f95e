"""What the framework callbacks share: their log keys, the on_nonfinite check, the run's NaN/Inf
totals kept on the device, and the monitor's findings reported once each."""

from __future__ import annotations

import math

import torch
from torch import nn

import gradstats

# The keys the callbacks add to the framework's logs.
NORM_KEY = "grad_norm"  # the total gradient norm before clipping (Hugging Face logs it itself)
NAN_KEY = "grad_nan_count"  # NaN gradient elements since training started
INF_KEY = "grad_inf_count"  # +-Inf gradient elements since training started
SKIPPED_KEY = "skipped_steps"  # optimizer steps skipped for NaN/Inf gradients so far
FINDINGS_KEY = "gradstats_findings"  # the number of problems GradMonitor has diagnosed
REPORT_KEY = "gradstats_report"  # GradMonitor.report(), when a new finding appears


def check_clip_arguments(
    on_nonfinite: str, max_norm: float = math.inf, norm_type: float | str = 2.0
) -> None:
    """Raises now, saying what was expected, rather than at the first step. The rules live in
    gradstats.clip_grad_norm_, which on no tensors checks its arguments and does nothing else."""
    gradstats.clip_grad_norm_([], max_norm, norm_type, on_nonfinite=on_nonfinite)


def check_monitor(monitor: bool | gradstats.GradMonitor) -> bool | gradstats.GradMonitor:
    if not isinstance(monitor, (bool, gradstats.GradMonitor)):
        raise TypeError(f"monitor must be a bool or a GradMonitor; got {type(monitor).__name__}")
    return monitor


def make_monitor(
    monitor: bool | gradstats.GradMonitor, model: nn.Module, watch_inputs: bool = True
) -> gradstats.GradMonitor | None:
    """monitor=True: a GradMonitor with default thresholds on the model (watch_inputs: through a
    hook on its forward); a GradMonitor: that one."""
    if isinstance(monitor, gradstats.GradMonitor):
        return monitor
    return gradstats.GradMonitor(model, watch_inputs=watch_inputs) if monitor else None


class NonfiniteTotals:
    """NaN and Inf gradient elements summed over a run, on the gradients' device: adding a step's
    counts does not synchronise, reading them does (once, for both)."""

    def __init__(self) -> None:
        self._counts = torch.zeros(2, dtype=torch.int64)

    def add(self, stats: gradstats.GradStats) -> None:
        step = torch.stack([stats.nan_count, stats.inf_count])
        if self._counts.device != step.device:
            self._counts = self._counts.to(step.device)
        self._counts += step

    def read(self) -> tuple[int, int]:
        nan, inf = self._counts.tolist()
        return nan, inf

    def load(self, nan: int, inf: int) -> None:
        self._counts = torch.tensor([nan, inf], dtype=torch.int64, device=self._counts.device)

    def as_floats(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The totals as float64 0-dim tensors (exact below 2**53), for loggers that take floats."""
        nan, inf = self._counts.to(torch.float64).unbind()
        return nan, inf


class FindingsReporter:
    """A GradMonitor's report, once for each new finding. diagnose() copies the monitor's buffers
    to the host (a sync), so the callbacks call new_report() only when the framework logs."""

    def __init__(self, monitor: gradstats.GradMonitor) -> None:
        self.monitor = monitor
        self.findings = 0
        self.report: str | None = None
        self._seen: set[tuple] = set()

    def new_report(self) -> str | None:
        """The monitor's report when it has found something not reported before, else None."""
        findings = self.monitor.diagnose()
        self.findings = len(findings)
        keys = {(f.cause, f.where, f.step) for f in findings}
        if keys <= self._seen:
            return None
        self._seen |= keys
        self.report = self.monitor.report()
        return self.report
