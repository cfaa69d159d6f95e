"""GradMonitor's output: the report, scalars for TensorBoard/W&B, and the plot."""

from __future__ import annotations

import math
import sys

import pytest
import torch
from helpers import DEVICES
from monitor_helpers import (
    RTOL,
    assert_diagnosis,
    exploding_run,
    set_grads,
    small_mlp,
    train_regression,
)

from gradstats import GradMonitor, grad_stats
from gradstats.bench.reads import counting_host_reads

# ------------------------------------------------------------------------ report, scalars


def test_report_says_what_when_where_and_what_to_do():
    text = exploding_run("cpu").report()
    assert "Exploding gradients at step 20, in 2.weight" in text
    assert "times its running median" in text
    assert "What to do: Clip the total gradient norm at" in text
    assert "max_norm=" in text


def test_assert_diagnosis_can_fail():
    """The comparison used above fails on a wrong cause and on a wrong step."""
    findings = exploding_run("cpu").diagnose()
    with pytest.raises(AssertionError, match="diagnosis differs"):
        assert_diagnosis(findings, {"vanishing_gradients": 20})
    with pytest.raises(AssertionError, match="diagnosis differs"):
        assert_diagnosis(findings, {"exploding_gradients": 19})
    with pytest.raises(AssertionError, match="diagnosis differs"):
        assert_diagnosis(findings, {})


@pytest.mark.parametrize("device", DEVICES)
def test_scalars_are_the_last_step_in_one_read(device):
    model = small_mlp(device)
    monitor = GradMonitor(model)
    with pytest.raises(RuntimeError, match="no step recorded"):
        monitor.scalars()
    model(torch.randn(2, 4, device=device) * 3)
    set_grads(model, {"0.weight": 3.0, "0.bias": 4.0, "2.weight": 0.0, "2.bias": 0.0})
    monitor.step()
    with counting_host_reads() as reads:
        values = monitor.scalars(prefix="m/")
    assert reads.total() == 1
    assert values["m/total_norm"] == pytest.approx(5.0, rel=RTOL)
    assert values["m/clip_coef"] == 1.0
    assert values["m/nonfinite_grads"] == 0.0
    assert values["m/grad_norm/0.bias"] == pytest.approx(4.0, rel=RTOL)
    assert values["m/max_abs/input[0]"] > 0
    assert values["m/nonfinite/input[0]"] == 0.0
    assert len(values) == 3 + 4 + 2


def test_log_to_tensorboard_writes_every_scalar():
    class Writer:
        def __init__(self):
            self.calls = []

        def add_scalar(self, tag, value, step):
            self.calls.append((tag, value, step))

    model = small_mlp()
    monitor = GradMonitor(model)
    set_grads(model, 1.0)
    monitor.step()
    monitor.step()
    writer = Writer()
    values = monitor.log_to_tensorboard(writer)
    assert writer.calls == [(k, v, 1) for k, v in values.items()]
    monitor.log_to_tensorboard(writer, step=7)
    assert writer.calls[-1][2] == 7


def test_log_to_real_tensorboard(tmp_path):
    pytest.importorskip("tensorboard")
    from torch.utils.tensorboard import SummaryWriter

    model = small_mlp()
    monitor = GradMonitor(model)
    set_grads(model, 1.0)
    monitor.step()
    with SummaryWriter(log_dir=str(tmp_path)) as writer:
        monitor.log_to_tensorboard(writer)
    assert list(tmp_path.glob("events.out.tfevents.*"))


# ------------------------------------------------------------------------------- plot


def test_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    model = small_mlp()
    monitor = GradMonitor(model)
    train_regression(model, monitor, steps=25, corrupt={10: "huge", 20: "nan"})
    params = list(model.parameters())
    set_grads(model, 1.0)
    monitor.step(stats=grad_stats(params, max_norm=0.5), params=params, skipped=True)
    path = monitor.plot(tmp_path / "monitor.png", title="test")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert path.stat().st_size > 10_000


def test_plot_before_any_step_says_so(tmp_path):
    pytest.importorskip("matplotlib")
    with pytest.raises(RuntimeError, match="no step recorded"):
        GradMonitor(small_mlp()).plot(tmp_path / "empty.png")


def test_plot_without_matplotlib_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    monitor = exploding_run("cpu")
    with pytest.raises(ImportError, match=r"pip install gradstats\[plot\]"):
        monitor.plot(tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


# ------------------------------------------------------------------------ NaN runs


# Per-parameter gradient norms of the clean steps, and of the NaN steps' finite values.
CLEAN_NORM = 3.0
NAN_STEP_NORM = 1000.0


def nan_run(steps: int, nan_steps, nan_input_step: int | None = None) -> GradMonitor:
    """Gradients of norm CLEAN_NORM per parameter; at nan_steps of NAN_STEP_NORM with one NaN
    value; at nan_input_step one input value is NaN as well."""
    model = small_mlp()
    monitor = GradMonitor(model)
    for step in range(steps):
        x = torch.randn(2, 4)
        if step == nan_input_step:
            x[0, 1] = math.nan
        model(x)
        set_grads(model, NAN_STEP_NORM if step in nan_steps else CLEAN_NORM)
        if step in nan_steps:
            model[0].bias.grad[0] = math.nan
        monitor.step()
    return monitor


def test_a_run_with_no_finite_step_says_so_not_norm_0():
    report = nan_run(6, nan_steps=range(6)).report()
    assert "no step had finite gradients (NaN/Inf in all 6 kept steps)" in report
    assert "total gradient norm median" not in report


def test_the_norm_summary_leaves_out_nan_steps():
    report = nan_run(6, nan_steps={1, 4}).report()
    # Four parameters of norm CLEAN_NORM each: the clean steps' total is twice it.
    summary = f"total gradient norm median {2 * CLEAN_NORM:g}, max {2 * CLEAN_NORM:g}"
    assert f"{summary} over the 4 steps with finite gradients" in report


def test_nan_gradient_advice_points_only_to_findings_that_exist():
    (alone,) = nan_run(6, nan_steps={3}).diagnose()
    assert "see the other findings" not in alone.advice
    assert "no other finding points to it" in alone.advice
    findings = nan_run(6, nan_steps={3}, nan_input_step=3).diagnose()
    assert_diagnosis(findings, {"bad_input": 3, "nonfinite_gradients": 3})
    nonfinite = next(f for f in findings if f.cause == "nonfinite_gradients")
    assert "see the other findings (Bad input data at step 3)" in nonfinite.advice
