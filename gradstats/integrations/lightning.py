"""Lightning Trainer: clipping through gradstats in one pass, NaN/Inf counts and skipped steps
through Lightning's loggers, non-finite steps skipped without advancing the LR scheduler.

    from gradstats.integrations.lightning import GradStatsCallback

    trainer = lightning.Trainer(callbacks=[GradStatsCallback(max_norm=1.0)])  # no gradient_clip_val

How (Lightning 2): on_fit_start runs after the strategy has made the optimizers from
configure_optimizers and before a checkpoint's optimizer states are loaded; there each optimizer is
wrapped in gradstats.ClipGradOptimizer(max_norm, norm_type, on_nonfinite, monitor). Lightning runs
the closure (training_step, backward, on_before_optimizer_step) inside optimizer.step(); the
wrapper then reads every gradient once for the norm, the NaN/Inf counts and the clip coefficient,
clips (inside the fused kernel for fused Adam/AdamW/SGD) and takes the inner step, or with
on_nonfinite="skip" does not: parameters and optimizer state stay bitwise unchanged. The Trainer's
own gradient_clip_val must stay unset: its clipping would read the gradients a second time.

LR schedulers: after each optimizer step Lightning steps the "step"-interval schedulers through
LightningModule.lr_scheduler_step. During fit this callback wraps that hook on the module instance:
after a skipped step (one host read of the wrapper's skipped-step counter, when a scheduler is due)
step-interval schedulers are not stepped; epoch-interval ones are stepped as usual. Under a
GradScaler (precision "16-mixed") this holds for the steps skipped on its overflows too. The hook is
put back at the end of fit, also when fit raises. trainer.global_step counts skipped steps too.

Where the clipping happens: inside each optimizer's step, not in Lightning's clipping hook
(configure_gradient_clipping): a LightningModule that overrides configure_gradient_clipping to clip
by itself reads the gradients a second time and clips them twice; leave it to the callback.

Manual optimization (automatic_optimization=False) is clipped too: every `opt.step()` of the
optimizers self.optimizers() returns is a ClipGradOptimizer step (its own statistics, clip, NaN
skip), so training_step needs no clip of its own (Lightning refuses gradient_clip_val there, and
self.clip_gradients would clip twice). The LR schedulers are the user's to step in manual
optimization: `opt.optimizer.skipped_steps` (a device counter) tells which steps were skipped.

Logging, at the steps Lightning writes to its loggers (every log_every_n_steps optimizer steps),
through LightningModule.log: grad_norm (before clipping), grad_nan_count and grad_inf_count (NaN
and Inf gradient elements since training started), skipped_steps, and with a monitor the number of
its findings (gradstats_findings). Checkpoints keep the counts (this callback's state) and the
skipped steps (the optimizer's state).

With monitor=True the monitor watches each training batch as the model's inputs (a training_step
need not call the LightningModule's forward); a GradMonitor passed in is used as configured.

Tested with Lightning from the oldest release pyproject.toml declares to the newest (README,
"Tested versions").
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from torch import Tensor

import gradstats
from gradstats.integrations._common import (
    FINDINGS_KEY,
    INF_KEY,
    NAN_KEY,
    NORM_KEY,
    SKIPPED_KEY,
    FindingsReporter,
    NonfiniteTotals,
    check_clip_arguments,
    check_monitor,
    make_monitor,
)

try:
    import lightning.pytorch as pl
    from lightning.pytorch.strategies import DeepSpeedStrategy
except ImportError as error:  # the extra is missing
    raise ImportError(
        "gradstats.integrations.lightning needs lightning: pip install 'gradstats[lightning]'"
    ) from error

logger = logging.getLogger(__name__)

# The LightningModule hook through which Lightning steps each LR scheduler.
_SCHEDULER_HOOK = "lr_scheduler_step"


class GradStatsCallback(pl.Callback):
    """Clips every optimizer step through gradstats and skips non-finite steps.

    Args:
        max_norm: clip the total gradient norm to this; None: no clipping (the statistics, the
            counts and the skipping remain).
        norm_type: the p of the p-norm (any p > 0, or inf).
        on_nonfinite: what a step with NaN/Inf gradients does: "skip" (no optimizer step, no
            step-interval LR scheduler step), "zero" (NaN/Inf elements zeroed, the rest clipped,
            step taken), "error" (raise, naming the parameters) or "propagate" (torch's
            behaviour).
        monitor: True attaches a gradstats.GradMonitor to the LightningModule (or pass one,
            configured); at the logging steps (not every step: diagnose() syncs) its findings are
            checked, and when a new one appears, monitor.report() goes to the Python logger as a
            warning and into `report`.

    Attributes:
        optimizers: the ClipGradOptimizers wrapping the Trainer's optimizers (after on_fit_start).
        monitor: the GradMonitor, or None.
        report: the last report, or None.
    """

    def __init__(
        self,
        max_norm: float | None = None,
        norm_type: float | str = 2.0,
        on_nonfinite: str = "skip",
        monitor: bool | gradstats.GradMonitor = False,
    ) -> None:
        self.max_norm = math.inf if max_norm is None else max_norm
        check_clip_arguments(on_nonfinite, self.max_norm, norm_type)
        self.norm_type = norm_type
        self.on_nonfinite = on_nonfinite
        self._monitor_option = check_monitor(monitor)
        self.monitor: gradstats.GradMonitor | None = None
        self._reporter: FindingsReporter | None = None
        self._watch_batches = False  # a monitor of ours: it reads each batch as the inputs
        self.optimizers: list[gradstats.ClipGradOptimizer] = []
        self._totals = NonfiniteTotals()
        self._seen: list[gradstats.GradStats | None] = []
        self._held: tuple[pl.LightningModule, Any] | None = None
        self._skipped_before: Tensor | None = None
        self._last_skipped: bool | None = None

    @property
    def report(self) -> str | None:
        return None if self._reporter is None else self._reporter.report

    @property
    def skipped_steps(self) -> int:
        """Optimizer steps skipped so far (reading syncs)."""
        return int(self._skipped_total()) if self.optimizers else 0

    # ------------------------------------------------------------------------------- setup

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        _check_setup(trainer)
        if self.monitor is None:
            # training_step may never call the module's forward: ours watches the batches.
            self.monitor = make_monitor(self._monitor_option, pl_module, watch_inputs=False)
            self._watch_batches = self._monitor_option is True
            self._reporter = None if self.monitor is None else FindingsReporter(self.monitor)
        self.optimizers = [
            gradstats.ClipGradOptimizer(
                optimizer,
                max_norm=self.max_norm,
                norm_type=self.norm_type,
                on_nonfinite=self.on_nonfinite,
                monitor=self.monitor,
            )
            for optimizer in trainer.optimizers
        ]
        trainer.optimizers = self.optimizers
        self._seen = [None] * len(self.optimizers)
        self._skipped_before = None
        # Steps are skipped under "skip", and under a GradScaler (16-mixed) on its overflows
        # whatever on_nonfinite says; otherwise the schedulers need no watching (and no sync).
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        skips = self.on_nonfinite == "skip" or scaler is not None
        if skips and trainer.lr_scheduler_configs:
            self._hold_schedulers(trainer, pl_module)

    def _hold_schedulers(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Wraps the module's lr_scheduler_step so that step-interval schedulers stay still after
        a skipped optimizer step."""
        self._release_schedulers()
        per_step = {id(c.scheduler) for c in trainer.lr_scheduler_configs if c.interval == "step"}
        original = getattr(pl_module, _SCHEDULER_HOOK)

        def lr_scheduler_step(scheduler: Any, metric: Any) -> None:
            if id(scheduler) in per_step and self._last_step_skipped():
                return
            original(scheduler, metric)

        # An instance attribute in front of the class's method, for the duration of fit; the one
        # the module may have had already is kept to be put back.
        self._held = (pl_module, vars(pl_module).get(_SCHEDULER_HOOK))
        setattr(pl_module, _SCHEDULER_HOOK, lr_scheduler_step)

    def _release_schedulers(self) -> None:
        if self._held is None:
            return
        pl_module, own = self._held
        self._held = None
        if own is not None:
            setattr(pl_module, _SCHEDULER_HOOK, own)
        elif _SCHEDULER_HOOK in vars(pl_module):
            delattr(pl_module, _SCHEDULER_HOOK)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._release_schedulers()

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._release_schedulers()

    # ----------------------------------------------------------------------------- stepping

    def _skipped_total(self) -> Tensor:
        first = self.optimizers[0].skipped_steps
        return sum((o.skipped_steps.to(first.device) for o in self.optimizers[1:]), first.clone())

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any
    ) -> None:
        """Runs inside the wrapper's step, before it decides: remembers the skipped count."""
        if self.optimizers:
            self._skipped_before = self._skipped_total()
            self._last_skipped = None

    def _last_step_skipped(self) -> bool:
        """Whether the last optimizer step was skipped (one host read per step, when asked)."""
        if self._skipped_before is None:
            return False
        if self._last_skipped is None:
            now = self._skipped_total()
            self._last_skipped = bool(now > self._skipped_before.to(now.device))
        return self._last_skipped

    # ------------------------------------------------------------------------------ logging

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._watch_batches and self.monitor is not None:
            self.monitor.watch_inputs(batch)

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        stepped = False
        for i, optimizer in enumerate(self.optimizers):
            stats = optimizer.last_stats
            if stats is not None and stats is not self._seen[i]:
                self._seen[i] = stats
                self._totals.add(stats)
                stepped = True
        every = trainer.log_every_n_steps
        if stepped and every and trainer.global_step % every == 0:
            self._log(trainer, pl_module)

    def _log(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """The counts and norms through LightningModule.log (device tensors: no sync here)."""
        nan, inf = self._totals.as_floats()
        values: dict[str, Tensor] = {
            NAN_KEY: nan,
            INF_KEY: inf,
            SKIPPED_KEY: self._skipped_total().to(torch.float64),
        }
        # An optimizer that has not clipped yet (no gradients so far) has no norm to log.
        norms = {
            i: o.last_stats.total_norm
            for i, o in enumerate(self.optimizers)
            if o.last_stats is not None
        }
        if len(self.optimizers) == 1:
            values.update({NORM_KEY: norms[0]} if norms else {})
        else:
            values.update({f"{NORM_KEY}/{i}": norm for i, norm in norms.items()})
        if self._reporter is not None:
            report = self._reporter.new_report()
            values[FINDINGS_KEY] = torch.tensor(float(self._reporter.findings))
            if report is not None:
                logger.warning("gradstats.GradMonitor at step %d:\n%s", trainer.global_step, report)
        pl_module.log_dict(values, on_step=True, on_epoch=False)

    # --------------------------------------------------------------------------- checkpoints

    def state_dict(self) -> dict[str, Any]:
        nan, inf = self._totals.read()
        return {NAN_KEY: nan, INF_KEY: inf}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._totals.load(int(state_dict.get(NAN_KEY, 0)), int(state_dict.get(INF_KEY, 0)))


def _check_setup(trainer: pl.Trainer) -> None:
    """Raises before the first step on a setup whose clipping or skipping would not work."""
    if trainer.gradient_clip_val:
        raise ValueError(
            "GradStatsCallback clips by itself: pass max_norm to it and leave the Trainer's "
            f"gradient_clip_val unset (got {trainer.gradient_clip_val}); Lightning's clipping "
            "would read every gradient a second time"
        )
    if isinstance(trainer.strategy, DeepSpeedStrategy):
        raise ValueError(
            "GradStatsCallback: DeepSpeed clips gradients inside its engine, out of gradstats' "
            "reach; remove the callback or use another strategy"
        )
    if any(isinstance(o, gradstats.ClipGradOptimizer) for o in trainer.optimizers):
        raise ValueError(
            "GradStatsCallback wraps the optimizers in gradstats.ClipGradOptimizer itself: "
            "return the plain optimizer from configure_optimizers, or drop the callback"
        )


__all__ = ["GradStatsCallback"]
