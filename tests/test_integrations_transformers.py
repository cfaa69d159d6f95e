"""gradstats.integrations.transformers against the real Trainer: a tiny GPT-2 built from a config,
random tokens, the CPU; no download. Stock Trainer runs are the reference and the negative
controls."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import equal_bitwise

transformers = pytest.importorskip(
    "transformers", reason="needs transformers (pip install 'gradstats[transformers]')"
)
pytest.importorskip("accelerate", reason="needs accelerate (pip install 'gradstats[transformers]')")

from hf_helpers import (  # noqa: E402
    MAX_GRAD_NORM,
    NAN_STEP,
    STEPS,
    NanAt,
    make_args,
    make_data,
    make_model,
    nan_probe,
    same_numbers,
    snapshot,
    step_logs,
    train,
    weights,
)

import gradstats  # noqa: E402
from gradstats.integrations.transformers import GradStatsCallback  # noqa: E402

# --------------------------------------------------------------------------- stock vs gradstats


# Plain SGD: its update is proportional to the clipped gradient, so a wrong clip coefficient shows
# in the losses (Adam's update hardly changes when every gradient is scaled by the same factor).
SGD = dict(optim="sgd", learning_rate=0.5)


def test_losses_and_norms_match_stock_trainer(tmp_path):
    stock = step_logs(train(tmp_path / "stock", **SGD))
    ours = step_logs(train(tmp_path / "ours", callbacks=[GradStatsCallback()], **SGD))
    assert len(stock) == len(ours) == STEPS
    assert all(h["grad_norm"] > MAX_GRAD_NORM for h in stock), "clipping must be active"
    for a, b in zip(stock, ours):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=0)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-5, abs=0)
        assert b["learning_rate"] == a["learning_rate"]
        assert (b["grad_nan_count"], b["grad_inf_count"], b["skipped_steps"]) == (0, 0, 0)


def test_gradient_accumulation_matches_stock_trainer(tmp_path):
    """With accumulation the Trainer clips once per optimizer step, after the last micro-batch."""
    settings = dict(**SGD, gradient_accumulation_steps=2, max_steps=8)
    stock = step_logs(train(tmp_path / "stock", **settings))
    ours = step_logs(train(tmp_path / "ours", callbacks=[GradStatsCallback()], **settings))
    assert len(ours) == 8
    for key in ("loss", "grad_norm"):
        assert [h[key] for h in ours] == pytest.approx([h[key] for h in stock], rel=1e-5)


def test_the_comparison_can_fail(tmp_path):
    """Negative control: a different clip threshold changes the losses beyond the tolerance."""
    stock = step_logs(train(tmp_path / "stock", **SGD))
    other = step_logs(train(tmp_path / "other", **SGD, max_grad_norm=1.001 * MAX_GRAD_NORM))
    assert any(b["loss"] != pytest.approx(a["loss"], rel=1e-5) for a, b in zip(stock, other))


def counting(monkeypatch, module, name, calls, key):
    original = getattr(module, name)

    def counted(*args, **kwargs):
        calls[key] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, counted)


def test_one_norm_pass_per_step_through_gradstats(tmp_path, monkeypatch):
    """One fused statistics launch per step and torch's clipping never runs; torch's function is
    back in place after training. (With monitor=True the monitor reuses that launch's statistics;
    it reads the model's floating-point inputs besides.)"""
    callback = GradStatsCallback()
    calls = {"stats": 0, "torch": 0}
    counting(monkeypatch, gradstats.ops, "stats", calls, "stats")
    counting(monkeypatch, gradstats.ops, "plan_stats", calls, "stats")
    counting(monkeypatch, torch.nn.utils, "clip_grad_norm_", calls, "torch")
    counting(monkeypatch, torch.nn.utils, "get_total_norm", calls, "torch")
    before = torch.nn.utils.clip_grad_norm_
    train(tmp_path, callbacks=[callback])
    assert calls == {"stats": STEPS, "torch": 0}
    assert torch.nn.utils.clip_grad_norm_ is before


def test_the_pass_count_would_see_a_second_pass(tmp_path, monkeypatch):
    """Negative control: with ClipGradOptimizer as the Trainer's optimizer (and the Trainer's own
    clipping on), torch's norm pass runs besides gradstats' every step."""
    calls = {"stats": 0, "torch": 0}
    counting(monkeypatch, gradstats.ops, "stats", calls, "stats")
    counting(monkeypatch, gradstats.ops, "plan_stats", calls, "stats")
    # accelerate computes the norm with one of them, depending on its release.
    counting(monkeypatch, torch.nn.utils, "clip_grad_norm_", calls, "torch")
    counting(monkeypatch, torch.nn.utils, "get_total_norm", calls, "torch")
    model = make_model()
    inner = torch.optim.AdamW(model.parameters(), lr=1e-3)
    transformers.Trainer(
        model=model,
        args=make_args(tmp_path),
        train_dataset=make_data(),
        optimizers=(gradstats.ClipGradOptimizer(inner, max_norm=MAX_GRAD_NORM), None),
    ).train()
    assert calls == {"stats": STEPS, "torch": STEPS}


def test_without_clipping_the_logged_norm_is_still_one_gradstats_pass(tmp_path):
    stock = step_logs(train(tmp_path / "stock", max_grad_norm=0.0))
    ours = step_logs(train(tmp_path / "ours", callbacks=[GradStatsCallback()], max_grad_norm=0.0))
    assert len(stock) == len(ours) == STEPS
    for a, b in zip(stock, ours):
        assert ("grad_norm" in a) == ("grad_norm" in b)  # logged where this release logs it
        if "grad_norm" in a:
            assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-5, abs=0)
        assert b["grad_nan_count"] == b["skipped_steps"] == 0


# ---------------------------------------------------------------------------- non-finite steps


def test_nan_step_is_skipped_without_a_scheduler_step(tmp_path):
    callback = GradStatsCallback()
    trainer = train(tmp_path, callbacks=[callback], nan_steps=[NAN_STEP])
    probe = nan_probe(trainer)
    assert equal_bitwise(probe.before, probe.after), "weights or optimizer state changed"
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    # LambdaLR counts its steps in last_epoch: one fewer than the optimizer steps.
    assert trainer.lr_scheduler.last_epoch == STEPS - 1
    logs = step_logs(trainer)
    lr = [h["learning_rate"] for h in logs]
    assert lr[NAN_STEP] == lr[NAN_STEP - 1], "the LR must not move past a skipped step"
    assert all(lr[i + 1] < lr[i] for i in range(STEPS - 1) if i != NAN_STEP - 1)
    nan_elements = probe.param.numel()
    assert [h["grad_nan_count"] for h in logs[NAN_STEP - 2 : NAN_STEP + 1]] == [
        0,
        nan_elements,
        nan_elements,
    ]
    assert [h["skipped_steps"] for h in logs[NAN_STEP - 2 : NAN_STEP + 1]] == [0, 1, 1]
    assert math.isnan(logs[NAN_STEP - 1]["grad_norm"])
    assert callback.skipped_steps == 1 and logs[-1]["grad_inf_count"] == 0


def test_stock_trainer_spreads_the_nan_and_steps_the_scheduler(tmp_path):
    """Negative control: without the callback the same NaN reaches the weights and the LR
    scheduler advances on every step."""
    trainer = train(tmp_path, nan_steps=[NAN_STEP])
    assert not all(torch.isfinite(p).all() for p in trainer.model.parameters())
    assert trainer.lr_scheduler.last_epoch == STEPS


def test_fp16_grad_scaler_is_updated_on_a_skipped_step(tmp_path):
    """With a GradScaler (fp16 on a GPU) accelerate steps through scaler.step() and update(); a
    skipped step must still update the scaler (scale backed off, unscale state cleared), as
    GradScaler does on a step it skips itself. Driven by hand with the events in the Trainer's
    order, on the CPU GradScaler."""
    from accelerate import Accelerator
    from accelerate.optimizer import AcceleratedOptimizer

    args = make_args(tmp_path)
    state, control = transformers.TrainerState(), transformers.TrainerControl()
    Accelerator(cpu=True)
    model = torch.nn.Linear(4, 2)
    inner = torch.optim.AdamW(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    optimizer = AcceleratedOptimizer(inner, scaler=scaler)
    callback = GradStatsCallback()
    events = dict(model=model, optimizer=optimizer)
    callback.on_train_begin(args, state, control, **events)

    def step(factor):
        scaler.scale(model(torch.randn(3, 4)).sum() * factor).backward()
        scaler.unscale_(inner)  # accelerator.clip_grad_norm_ unscales first
        torch.nn.utils.clip_grad_norm_(list(model.parameters()), 1.0)
        callback.on_pre_optimizer_step(args, state, control, **events)
        optimizer.step()
        callback.on_optimizer_step(args, state, control, **events)
        model.zero_grad()
        return optimizer.step_was_skipped

    try:
        assert not step(1.0)
        before = snapshot(model, inner)
        assert step(math.nan)
        assert equal_bitwise(before, snapshot(model, inner))
        assert scaler.get_scale() == 512.0
        assert not step(1.0)  # the scaler is usable again, the skipped flag cleared
        assert not equal_bitwise(before, snapshot(model, inner))
    finally:
        callback.on_train_end(args, state, control, **events)
    assert callback.skipped_steps == 1
    assert torch.nn.utils.clip_grad_norm_ is torch.nn.utils.clip_grad.clip_grad_norm_


def test_propagate_behaves_as_stock(tmp_path):
    trainer = train(tmp_path, callbacks=[GradStatsCallback("propagate")], nan_steps=[NAN_STEP])
    assert not all(torch.isfinite(p).all() for p in trainer.model.parameters())
    assert trainer.lr_scheduler.last_epoch == STEPS
    assert step_logs(trainer)[-1]["skipped_steps"] == 0


def test_error_raises_naming_the_parameter(tmp_path):
    with pytest.raises(RuntimeError, match="NaN"):
        train(tmp_path, callbacks=[GradStatsCallback("error")], nan_steps=[NAN_STEP])
    # torch's functions are back once the next training begins and ends.
    train(tmp_path / "next", callbacks=[GradStatsCallback()], max_steps=1)
    assert torch.nn.utils.clip_grad_norm_ is torch.nn.utils.clip_grad.clip_grad_norm_
    assert torch.nn.utils.clip_grad_norm_.__module__ == "torch.nn.utils.clip_grad"


def test_bad_arguments_raise_at_construction():
    with pytest.raises(ValueError, match="on_nonfinite"):
        GradStatsCallback("ignore")
    with pytest.raises(TypeError, match="monitor"):
        GradStatsCallback(monitor="yes")


def test_clip_grad_optimizer_with_the_callback_is_refused(tmp_path):
    model = make_model()
    inner = torch.optim.AdamW(model.parameters(), lr=1e-3)
    trainer = transformers.Trainer(
        model=model,
        args=make_args(tmp_path),
        train_dataset=make_data(),
        optimizers=(gradstats.ClipGradOptimizer(inner, max_norm=1.0), None),
        callbacks=[GradStatsCallback()],
    )
    with pytest.raises(ValueError, match="plain optimizer"):
        trainer.train()


# ----------------------------------------------------------------------------------- monitor


def test_monitor_reports_the_nan_at_log_time(tmp_path, caplog):
    callback = GradStatsCallback(monitor=True)
    trainer = train(tmp_path, callbacks=[callback], nan_steps=[NAN_STEP])
    reports = [h for h in trainer.state.log_history if "gradstats_report" in h]
    assert len(reports) == 1 and reports[0]["step"] == NAN_STEP
    assert "c_fc.weight" in reports[0]["gradstats_report"]
    assert callback.monitor.num_steps == STEPS
    assert any("GradMonitor" in r.message for r in caplog.records)


def test_monitor_is_quiet_on_healthy_training(tmp_path):
    trainer = train(tmp_path, callbacks=[GradStatsCallback(monitor=True)])
    assert not any("gradstats_report" in h for h in trainer.state.log_history)


# ------------------------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("with_optimizer", [False, True], ids=["callback", "ClipGradOptimizer"])
def test_resume_from_checkpoint_gives_the_same_run(tmp_path, with_optimizer):
    """Saved at step 12 and resumed: the same losses, norms, counts and bitwise the same weights
    as the uninterrupted run, NaN steps skipped before and after the checkpoint."""
    half = STEPS // 2

    def run(out, resume=None, max_steps=STEPS):
        model = make_model()
        callbacks = [NanAt(model, [NAN_STEP, half + NAN_STEP])]
        optimizers = (None, None)
        if with_optimizer:
            inner = torch.optim.AdamW(model.parameters(), lr=1e-3)
            optimizers = (gradstats.ClipGradOptimizer(inner, max_norm=MAX_GRAD_NORM), None)
        else:
            callbacks.insert(0, GradStatsCallback())
        args = make_args(
            out,
            max_steps=max_steps,
            save_strategy="steps",
            save_steps=half,
            max_grad_norm=0.0 if with_optimizer else MAX_GRAD_NORM,
        )
        trainer = transformers.Trainer(
            model=model,
            args=args,
            train_dataset=make_data(),
            callbacks=callbacks,
            optimizers=optimizers,
        )
        trainer.train(resume_from_checkpoint=resume)
        return trainer

    whole = run(tmp_path / "whole")
    # The uninterrupted run wrote checkpoint-12 on its way; a run stopped there had the same.
    resumed = run(tmp_path / "resumed", resume=str(tmp_path / "whole" / f"checkpoint-{half}"))
    assert equal_bitwise(weights(whole), weights(resumed))
    keys = ["loss", "learning_rate"] + (["grad_norm"] if "grad_norm" in step_logs(whole)[0] else [])
    if not with_optimizer:
        keys += ["grad_nan_count", "grad_inf_count", "skipped_steps"]
    assert len(step_logs(resumed)) == len(step_logs(whole)) == STEPS
    for a, b in zip(step_logs(whole)[half:], step_logs(resumed)[half:]):
        assert same_numbers([a[k] for k in keys], [b[k] for k in keys]), (a, b)
    if not with_optimizer:
        assert step_logs(resumed)[-1]["skipped_steps"] == 2
        assert whole.lr_scheduler.last_epoch == resumed.lr_scheduler.last_epoch == STEPS - 2
    else:
        assert int(resumed.optimizer.optimizer.skipped_steps) == 2
