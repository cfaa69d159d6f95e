"""Hugging Face Trainer: clipping through gradstats in one pass, NaN/Inf counts and skipped steps
in the logs, non-finite steps skipped without advancing the LR scheduler.

    from gradstats.integrations.transformers import GradStatsCallback

    args = TrainingArguments(..., max_grad_norm=1.0)
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[GradStatsCallback()])

How: the Trainer clips (and computes the norm it logs as grad_norm) through accelerate, which calls
torch.nn.utils' clipping functions; which ones depends on the release (accelerate 1.15:
clip_grad_norm_; 1.16: get_total_norm per device mesh, then clip_grads_with_norm_). From
on_train_begin to on_train_end those three functions are gradstats' (gradstats.patch_torch), and
the callback does not care which of them the Trainer calls: the first call that reads the model's
gradients in a step takes the step's statistics in one pass (the norm, per-tensor norms, NaN/Inf
counts), and every call on those gradients is answered from them (integrations/_step_stats.py).
No second norm pass. If a future release computes the norm without these functions (or a model's
own clip_grad_norm_ does, as FSDP1's), the callback takes the statistics itself before the
optimizer step (one pass, after the framework's own clipping: a NaN norm has then spread NaN to
every element it scaled) and warns once, naming the versions: skipping and counting go on.

on_nonfinite="skip" (the default): a step whose gradients hold NaN/Inf (or whose norm overflows)
leaves them untouched, and on_pre_optimizer_step reads that flag (one host sync per step).
For such a step the Trainer's optimizer.step() takes no step: parameters and optimizer state
(step counters included) stay bitwise as they were; with an fp16 GradScaler the scaler is updated
as on any step it skips itself. The accelerate optimizer then reports step_was_skipped, so
`accelerator.optimizer_step_was_skipped` is True and the Trainer does not advance its LR scheduler,
exactly as for a step the GradScaler skips. The Trainer's global_step still counts the step.
"zero", "error" and "propagate" act as in gradstats.clip_grad_norm_ (no per-step sync).

Logs: every training log (those with grad_norm) gains grad_nan_count and grad_inf_count (NaN and
Inf gradient elements since training started) and skipped_steps, in trainer.state.log_history and
in the logs that callbacks after this one receive (the Trainer's reporting integrations come before
user callbacks: to send these to TensorBoard or W&B, pass report_to="none" and put their callbacks
after this one). The counts are saved in checkpoints (trainer_state.json) and resumed.

Tested with transformers and accelerate from the oldest releases pyproject.toml declares to the
newest (README, "Tested versions").
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

import torch.nn.utils
from torch import nn

import gradstats
from gradstats.integrations._common import (
    INF_KEY,
    NAN_KEY,
    NORM_KEY,
    REPORT_KEY,
    SKIPPED_KEY,
    FindingsReporter,
    NonfiniteTotals,
    check_clip_arguments,
    check_monitor,
    make_monitor,
)
from gradstats.integrations._step_stats import StepStatistics

try:
    import accelerate
    import transformers
    from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
    from transformers.trainer_callback import ExportableState
except ImportError as error:  # the extra is missing
    raise ImportError(
        "gradstats.integrations.transformers needs transformers and accelerate: "
        "pip install 'gradstats[transformers]'"
    ) from error

logger = logging.getLogger(__name__)

# accelerate's AcceleratedOptimizer reports a skipped step through this attribute (read by its
# step_was_skipped property, which Accelerator.optimizer_step_was_skipped asks); its own step()
# sets it when a GradScaler skips.
_SKIPPED_FLAG = "_is_overflow"
# The key of the training loss in the Trainer's logs of training steps.
_LOSS_KEY = "loss"


class GradStatsCallback(TrainerCallback, ExportableState):
    """Routes the Trainer's gradient clipping through gradstats and skips non-finite steps.

    Args:
        on_nonfinite: what a step with NaN/Inf gradients does: "skip" (no optimizer step, no LR
            scheduler step), "zero" (NaN/Inf elements zeroed, the rest clipped, step taken),
            "error" (raise, naming the parameters) or "propagate" (torch's behaviour).
        monitor: True attaches a gradstats.GradMonitor to the model (or pass one, configured);
            at each training log (not every step: diagnose() syncs) its findings are checked, and
            when a new one appears, monitor.report() goes into the log under "gradstats_report"
            and to the Python logger as a warning.

    Attributes:
        skipped_steps: optimizer steps skipped so far (resumed from checkpoints).
        monitor: the GradMonitor, or None.
        report: the last report logged, or None.
    """

    def __init__(self, on_nonfinite: str = "skip", monitor: bool | gradstats.GradMonitor = False):
        check_clip_arguments(on_nonfinite)
        self.on_nonfinite = on_nonfinite
        self._monitor_option = check_monitor(monitor)
        self.monitor: gradstats.GradMonitor | None = None
        self._reporter: FindingsReporter | None = None
        self.skipped_steps = 0
        self._totals = NonfiniteTotals()
        self._steps: StepStatistics | None = None
        self._warned = False  # about a norm that did not come through torch's functions
        self._held: Any = None  # the optimizer whose next step() is held back
        self._flagged: Any = None  # the optimizer this callback marked as having skipped

    @property
    def report(self) -> str | None:
        return None if self._reporter is None else self._reporter.report

    # Settable, so that the Trainer can restore them from a checkpoint's callback state.
    @property
    def grad_nan_count(self) -> int:
        """NaN gradient elements since training started (reading syncs)."""
        return self._totals.read()[0]

    @grad_nan_count.setter
    def grad_nan_count(self, value: int) -> None:
        self._totals.load(int(value), self.grad_inf_count)

    @property
    def grad_inf_count(self) -> int:
        """Inf gradient elements since training started (reading syncs)."""
        return self._totals.read()[1]

    @grad_inf_count.setter
    def grad_inf_count(self, value: int) -> None:
        self._totals.load(self.grad_nan_count, int(value))

    def state(self) -> dict[str, Any]:
        """What the Trainer saves in its checkpoints (ExportableState)."""
        nan, inf = self._totals.read()
        monitor = self._monitor_option is not False
        return {
            "args": {"on_nonfinite": self.on_nonfinite, "monitor": monitor},
            "attributes": {SKIPPED_KEY: self.skipped_steps, NAN_KEY: nan, INF_KEY: inf},
        }

    # ------------------------------------------------------------------------------ training

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        model: nn.Module = kwargs["model"]
        optimizer = kwargs["optimizer"]
        _check_setup(args, optimizer)
        self._restore_counts(state)
        if self.monitor is None:
            self.monitor = make_monitor(self._monitor_option, model)
            self._reporter = None if self.monitor is None else FindingsReporter(self.monitor)
        _end_stale_patch()
        self._steps = StepStatistics(list(model.parameters()), self.on_nonfinite)
        self._steps.install()

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._end_patch()
        self._release()

    def _end_patch(self) -> None:
        if self._steps is not None:
            self._steps.uninstall()
            self._steps = None

    def _restore_counts(self, state: TrainerState) -> None:
        """A fresh run counts from zero; a resumed one from the checkpoint's callback state."""
        saved = state.stateful_callbacks.get(type(self).__name__) if state.global_step else None
        if isinstance(saved, list):  # several callbacks of this class: the first one's
            saved = saved[0]
        attributes = saved.get("attributes", {}) if isinstance(saved, dict) else {}
        self.skipped_steps = int(attributes.get(SKIPPED_KEY, 0))
        self._totals.load(int(attributes.get(NAN_KEY, 0)), int(attributes.get(INF_KEY, 0)))

    def on_step_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self._steps is not None:
            self._steps.discard()

    def on_substep_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """After a micro-batch whose gradients are still accumulating: whatever was read during
        it is not the step's statistics."""
        if self._steps is not None:
            self._steps.discard()

    def on_pre_optimizer_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """The step's statistics (taken when the Trainer computed its norm, or now): counted,
        handed to the monitor, and under "skip" the optimizer step held back if non-finite."""
        if self._steps is None:
            return
        stats, params, read_by_the_trainer = self._steps.take()
        if not read_by_the_trainer:
            self._warn_norm_elsewhere(args)
        self._totals.add(stats)
        skipping = self.on_nonfinite == "skip"
        if self.monitor is not None:
            skipped = stats.any_nonfinite if skipping else False
            self.monitor.step(stats=stats, params=params, skipped=skipped)
        optimizer = kwargs["optimizer"]
        if self._flagged is optimizer:  # the flag of a previous skipped step, now stale
            setattr(optimizer, _SKIPPED_FLAG, False)
            self._flagged = None
        if skipping and bool(stats.any_nonfinite):
            self._hold(optimizer)

    def _warn_norm_elsewhere(self, args: TrainingArguments) -> None:
        """Once per callback: the Trainer clipped, but not through torch's functions. (Without
        clipping, max_grad_norm=0, some releases compute no norm at all: nothing to warn about,
        the callback's pass is then the step's only one.)"""
        if self._warned or not args.max_grad_norm > 0:
            return
        self._warned = True
        warnings.warn(
            "GradStatsCallback: the Trainer clipped the gradients without torch.nn.utils' "
            "clipping functions this step "
            f"(transformers {transformers.__version__}, accelerate {accelerate.__version__}, "
            f"torch {torch.__version__}), so gradstats read the gradients itself before the "
            "optimizer step (one more pass). NaN/Inf steps are still counted and handled by "
            f"on_nonfinite={self.on_nonfinite!r}; the counts are those of the gradients as the "
            "framework left them (its own clip by a NaN norm makes every element it scales NaN).",
            RuntimeWarning,
            stacklevel=2,
        )

    def on_optimizer_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._release()

    def _hold(self, optimizer: Any) -> None:
        """The Trainer's next optimizer.step() takes no step and reports itself skipped."""

        def skipped_step(closure: Any = None) -> None:
            scaler = getattr(optimizer, "scaler", None)
            if scaler is not None:
                # GradScaler.step() followed by update() on a step it skips does only this:
                # the found-inf flags recorded while unscaling adjust the scale.
                scaler.update()
            setattr(optimizer, _SKIPPED_FLAG, True)

        # An instance attribute, read before the class's step(): removed again after the call.
        optimizer.step = skipped_step
        self._held = optimizer
        self._flagged = optimizer
        self.skipped_steps += 1

    def _release(self) -> None:
        if self._held is not None and "step" in vars(self._held):
            del self._held.step
        self._held = None

    # ------------------------------------------------------------------------------- logging

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        """Adds the counts to a training log (one sync), and the monitor's report when it has
        found something new."""
        if logs is None or not _is_training_log(logs):
            return
        nan, inf = self._totals.read()
        extra: dict[str, Any] = {NAN_KEY: nan, INF_KEY: inf, SKIPPED_KEY: self.skipped_steps}
        if self._reporter is not None:
            report = self._reporter.new_report()
            if report is not None:
                extra[REPORT_KEY] = report
                logger.warning("gradstats.GradMonitor at step %d:\n%s", state.global_step, report)
        logs.update(extra)
        # The Trainer appended its copy of these logs to the history just before this event.
        last = state.log_history[-1] if state.log_history else {}
        if _is_training_log(last) and last.get("step") == state.global_step:
            last.update(extra)


def _is_training_log(logs: dict[str, Any]) -> bool:
    """A log of training steps: it has the loss (and grad_norm, when the Trainer computes one;
    with max_grad_norm=0 older releases do not)."""
    return NORM_KEY in logs or _LOSS_KEY in logs


def _end_stale_patch() -> None:
    """A train() that raised never reached on_train_end, leaving its callback's functions in
    torch: the next training puts back what was there before them."""
    owner = getattr(torch.nn.utils.clip_grad_norm_, "__self__", None)
    if isinstance(owner, StepStatistics):
        owner.uninstall()


def _check_setup(args: TrainingArguments, optimizer: Any) -> None:
    """Raises before the first step on a setup whose clipping or skipping would not work."""
    if getattr(args, "deepspeed", None):
        raise ValueError(
            "GradStatsCallback: DeepSpeed clips gradients inside its engine, out of gradstats' "
            "reach; remove the callback or train without DeepSpeed"
        )
    if not hasattr(optimizer, _SKIPPED_FLAG):
        raise TypeError(
            "GradStatsCallback needs the Trainer's optimizer to be accelerate's "
            f"AcceleratedOptimizer (transformers >= 5); got {type(optimizer).__name__}"
        )
    inner = getattr(optimizer, "optimizer", None)
    if isinstance(inner, gradstats.ClipGradOptimizer):
        raise ValueError(
            "GradStatsCallback clips and skips steps itself: pass the plain optimizer to the "
            "Trainer (not a gradstats.ClipGradOptimizer), or drop the callback"
        )


__all__ = ["GradStatsCallback"]
