"""The Hugging Face callback whichever way the Trainer's norm is computed: accelerate <= 1.15 (one
clip_grad_norm_ call), accelerate 1.16 (get_total_norm per device mesh, then clip_grads_with_norm_)
and a release that uses none of torch's clipping functions. Each path is installed on the Trainer's
Accelerator, so every path runs whatever accelerate release is installed; the stock Trainer on the
same path is the reference."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from helpers import equal_bitwise

transformers = pytest.importorskip(
    "transformers", reason="needs transformers (pip install 'gradstats[transformers]')"
)
pytest.importorskip("accelerate", reason="needs accelerate (pip install 'gradstats[transformers]')")

from hf_helpers import MAX_GRAD_NORM, NAN_STEP, STEPS, nan_probe, step_logs, train  # noqa: E402

import gradstats  # noqa: E402
from gradstats.integrations.transformers import GradStatsCallback  # noqa: E402

SGD = dict(optim="sgd", learning_rate=0.5)
TORCH_PATHS = ["one call", "per mesh"]


def count_gradient_passes(monkeypatch, trainer_model_params):
    """Counts the native statistics calls that read the model's gradients (not those over a
    handful of per-tensor norms)."""
    calls = {"passes": 0}
    stats, plan_stats = gradstats.ops.stats, gradstats.ops.plan_stats

    def counted_stats(tensors, *args, **kwargs):
        grads = {id(p.grad) for p in trainer_model_params() if p.grad is not None}
        calls["passes"] += any(id(t) in grads for t in tensors)
        return stats(tensors, *args, **kwargs)

    def counted_plan_stats(*args, **kwargs):
        calls["passes"] += 1
        return plan_stats(*args, **kwargs)

    monkeypatch.setattr(gradstats.ops, "stats", counted_stats)
    monkeypatch.setattr(gradstats.ops, "plan_stats", counted_plan_stats)
    return calls


@pytest.mark.parametrize("path", TORCH_PATHS)
def test_every_torch_path_matches_stock_in_one_pass_a_step(tmp_path, monkeypatch, path):
    stock = step_logs(train(tmp_path / "stock", clip_path=path, **SGD))
    model_params: list = []
    calls = count_gradient_passes(monkeypatch, lambda: model_params)

    class Params(GradStatsCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            model_params[:] = list(kwargs["model"].parameters())
            super().on_train_begin(args, state, control, **kwargs)

    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no "norm computed elsewhere" warning
        ours = step_logs(train(tmp_path / "ours", callbacks=[Params()], clip_path=path, **SGD))
    assert calls["passes"] == STEPS
    assert len(stock) == len(ours) == STEPS
    assert all(h["grad_norm"] > MAX_GRAD_NORM for h in stock), "clipping must be active"
    for a, b in zip(stock, ours):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=0)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-5, abs=0)


@pytest.mark.parametrize("path", [*TORCH_PATHS, "own way"])
def test_a_nan_step_is_skipped_on_every_path(tmp_path, path):
    callback = GradStatsCallback()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = train(tmp_path, callbacks=[callback], nan_steps=[NAN_STEP], clip_path=path)
    probe = nan_probe(trainer)
    assert equal_bitwise(probe.before, probe.after), "weights or optimizer state changed"
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    assert trainer.lr_scheduler.last_epoch == STEPS - 1, "the scheduler stepped past the skip"
    logs = step_logs(trainer)
    assert [h["skipped_steps"] for h in logs[NAN_STEP - 2 : NAN_STEP]] == [0, 1]
    assert logs[NAN_STEP - 2]["grad_nan_count"] == 0
    assert logs[NAN_STEP - 1]["grad_nan_count"] >= probe.param.numel()
    ours = [w for w in caught if "GradStatsCallback" in str(w.message)]
    if path == "own way":
        # Warned once, naming the versions, though 24 steps went this way.
        assert len(ours) == 1
        message = str(ours[0].message)
        assert f"transformers {transformers.__version__}" in message
        assert "accelerate" in message and f"torch {torch.__version__}" in message
    else:
        assert ours == []


def test_the_gradient_counts_are_exact_when_the_norm_comes_through_torch(tmp_path):
    """Through torch's functions (here accelerate 1.16's path) the counts are taken before any
    clip: exactly the injected NaN elements, none spread by a NaN coefficient."""
    trainer = train(tmp_path, callbacks=[GradStatsCallback()], nan_steps=[NAN_STEP], **SGD)
    trainer_1_16 = train(
        tmp_path / "mesh",
        callbacks=[GradStatsCallback()],
        nan_steps=[NAN_STEP],
        clip_path="per mesh",
        **SGD,
    )
    for run in (trainer, trainer_1_16):
        logs = step_logs(run)
        assert logs[NAN_STEP - 1]["grad_nan_count"] == nan_probe(run).param.numel()


def test_zero_under_the_per_mesh_path_zeroes_and_clips_by_the_finite_norm(tmp_path):
    """on_nonfinite="zero" when the Trainer clips per mesh: the NaN elements are zeroed, the norm
    handed to the Trainer is the finite values', the step is taken and the scheduler moves."""
    trainer = train(
        tmp_path,
        callbacks=[GradStatsCallback("zero")],
        nan_steps=[NAN_STEP],
        clip_path="per mesh",
        **SGD,
    )
    probe = nan_probe(trainer)
    assert not equal_bitwise(probe.before, probe.after), "the zeroed step must be taken"
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    assert trainer.lr_scheduler.last_epoch == STEPS
    logs = step_logs(trainer)
    assert math.isfinite(logs[NAN_STEP - 1]["grad_norm"])
    assert logs[NAN_STEP - 1]["grad_nan_count"] == probe.param.numel()
    assert logs[-1]["skipped_steps"] == 0


def test_stock_trainer_on_the_per_mesh_path_spreads_the_nan(tmp_path):
    """Negative control for the two tests above: the same path without the callback."""
    trainer = train(tmp_path, nan_steps=[NAN_STEP], clip_path="per mesh", **SGD)
    assert not all(torch.isfinite(p).all() for p in trainer.model.parameters())
    assert trainer.lr_scheduler.last_epoch == STEPS


def test_calls_on_other_tensors_during_training_are_plain_gradstats(tmp_path):
    """A torch clipping call on tensors that are not the model's gradients neither counts nor
    decides the step, on any of torch's functions."""
    callback = GradStatsCallback()
    norms = []

    class OtherTensors(transformers.TrainerCallback):
        def on_step_begin(self, *args, **kwargs):
            p = torch.nn.Parameter(torch.ones(3))
            p.grad = torch.full((3,), math.nan)
            torch.nn.utils.clip_grad_norm_([p], 1.0)
            norms.append(torch.nn.utils.get_total_norm([torch.full((4,), 2.0)]))
            torch.nn.utils.clip_grads_with_norm_([p], 1.0, torch.tensor(2.0))

    trainer = train(tmp_path, callbacks=[callback, OtherTensors()], max_steps=4)
    assert step_logs(trainer)[-1]["grad_nan_count"] == 0
    assert callback.skipped_steps == 0
    assert [float(n) for n in norms] == [4.0] * 4
