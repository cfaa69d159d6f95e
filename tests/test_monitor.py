"""GradMonitor's rules: the three causes and the healthy case, NaN/Inf gradients and activations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers import DEVICES
from monitor_helpers import (
    NAN,
    RTOL,
    assert_diagnosis,
    causes,
    exploding_run,
    load_example,
    set_grads,
    small_mlp,
    train_regression,
)
from torch import nn

from gradstats import GradMonitor, MonitorThresholds

# ------------------------------------------------------------------------------ healthy


@pytest.mark.parametrize("device", DEVICES)
def test_healthy_training_has_no_finding(device):
    model = small_mlp(device)
    with GradMonitor(model, watch_modules="all") as monitor:
        train_regression(model, monitor, steps=120, device=device)
    assert monitor.diagnose() == []
    assert "No problem found" in monitor.report()


def test_healthy_noisy_rnn_has_no_finding():
    """A ReLU RNN at a safe learning rate: its total norm swings by more than 10x from step to step
    after the first steps; no swing is an explosion."""
    example = load_example("nan_exploding")
    torch.manual_seed(0)
    model = example.SumRNN()
    monitor = GradMonitor(model, watch_modules="all")
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    for _ in range(60):
        x = torch.randn(16, 30, 4)
        loss = nn.functional.mse_loss(model(x), x.sum(dim=(1, 2)).unsqueeze(1) / math.sqrt(30))
        optimizer.zero_grad()
        loss.backward()
        monitor.step()
        optimizer.step()
    total = monitor.history().total_norm[monitor.thresholds.min_history :]
    assert total.max() / total.min() > 10, "the run should be noisy for this test to mean much"
    assert monitor.diagnose() == []


def test_spike_after_convergence_is_not_exploding():
    """Norms that decay while the loss converges, then a spike about 200x the running median that
    stays below the norms seen earlier: not an explosion."""
    model = small_mlp()
    monitor = GradMonitor(model)
    for step in range(60):
        set_grads(model, 10.0 ** (-step / 15))
        monitor.step()
    set_grads(model, 0.9)
    monitor.step()
    assert monitor.history().total_norm[-1] > 100 * np.median(monitor.history().total_norm[-51:-1])
    assert monitor.diagnose() == []


# ---------------------------------------------------------------------------- exploding


@pytest.mark.parametrize("device", DEVICES)
def test_exploding_jump_found_at_its_step_with_evidence(device):
    monitor = exploding_run(device)
    assert_diagnosis(monitor.diagnose(), {"exploding_gradients": 20})
    (finding,) = monitor.diagnose()
    assert finding.where == ("2.weight",)
    h = monitor.history()
    median = float(np.median(h.total_norm[:20]))
    assert finding.evidence["total_norm"] == pytest.approx(h.total_norm[20], rel=RTOL)
    assert finding.evidence["ratio"] == pytest.approx(h.total_norm[20] / median, rel=RTOL)
    # The suggestion: the 90th percentile of the healthy norms, leaving out the first steps.
    healthy = h.total_norm[monitor.thresholds.min_history : 20]
    expected = float(f"{np.percentile(healthy, 90):.2g}")
    assert finding.evidence["suggested_max_norm"] == expected
    assert "times its running median" in finding.message
    assert "4.4e16 at step 20" in finding.message


def test_exploding_by_sustained_growth():
    model = small_mlp()
    # Only the growth rule can fire.
    monitor = GradMonitor(model, thresholds=MonitorThresholds(explode_factor=1e12))
    for step in range(40):
        set_grads(model, 1.0 if step < 10 else 1.5 ** (step - 10))
        monitor.step()
    (finding,) = monitor.diagnose()
    assert finding.cause == "exploding_gradients"
    # 1.5**18 > 1e3 is the first 20-step stretch (steps 8-28, 18 rises of 20) that qualifies.
    assert finding.step == 8
    assert "-fold over 20 steps" in finding.message


def test_growth_that_is_mostly_flat_is_not_exploding():
    """A 1e3-fold rise in one step of a flat stretch is a jump, not sustained growth."""
    model = small_mlp()
    strict = MonitorThresholds(explode_factor=1e12, explode_abs_limit=1e30)
    monitor = GradMonitor(model, thresholds=strict)
    for step in range(30):
        set_grads(model, 1.0 if step < 25 else 2e3)
        monitor.step()
    assert monitor.diagnose() == []


def test_absolute_limit_finds_an_explosion_without_history():
    model = small_mlp()
    monitor = GradMonitor(model)
    for step in range(3):
        set_grads(model, 1e14 if step == 1 else 1.0)
        monitor.step()
    assert_diagnosis(monitor.diagnose(), {"exploding_gradients": 1})
    assert "absolute limit" in monitor.diagnose()[0].message


def test_exploding_example():
    monitor = load_example("nan_exploding").train()
    findings = monitor.diagnose()
    assert findings[0].cause == "exploding_gradients"
    assert findings[0].step == 30
    assert "rnn.weight_hh_l0" in findings[0].where
    assert_diagnosis(
        findings,
        {"exploding_gradients": 30, "nonfinite_gradients": 31, "nonfinite_activations": 31},
    )
    activations = next(f for f in findings if f.cause == "nonfinite_activations")
    assert activations.where == ("rnn",)


# ---------------------------------------------------------------------------- vanishing


def test_vanishing_example_names_the_early_layers():
    monitor = load_example("nan_vanishing").train()
    (finding,) = monitor.diagnose()
    assert finding.cause == "vanishing_gradients"
    assert finding.step == 0
    assert finding.where[:2] == ("0.weight", "0.bias")
    assert "24.weight" not in finding.where  # the output layer learns
    assert finding.evidence["smallest_ratio"] < 1e-9


def test_vanishing_example_fixed_has_no_finding():
    assert load_example("nan_vanishing").train(fixed=True).diagnose() == []


@pytest.mark.parametrize("device", DEVICES)
def test_vanishing_needs_persistence_and_counts_exact_zeros(device):
    model = small_mlp(device)
    monitor = GradMonitor(model, thresholds=MonitorThresholds(vanish_steps=10))
    for step in range(30):
        norms = {"0.weight": 1e-9, "0.bias": 1.0, "2.weight": 1.0, "2.bias": 1.0}
        if 5 <= step < 5 + 9:  # one step too short to count
            norms["2.bias"] = 0.0
        if step >= 12:
            norms["0.bias"] = 0.0
        set_grads(model, norms)
        monitor.step()
    (finding,) = monitor.diagnose()
    assert finding.cause == "vanishing_gradients"
    assert finding.where == ("0.weight", "0.bias")
    assert finding.step == 0
    assert finding.evidence["zero_layers"] == 1
    assert "0.bias (exactly 0)" in finding.message


def test_bias_cancelled_by_batchnorm_is_not_vanishing():
    """A conv bias right before BatchNorm gets (numerically) no gradient by design: it is the only
    tiny parameter, and 1-D, so no layer is vanishing."""
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 36, 10)
    )
    monitor = GradMonitor(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(15):
        loss = nn.functional.cross_entropy(
            model(torch.randn(16, 3, 8, 8)), torch.randint(0, 10, (16,))
        )
        optimizer.zero_grad()
        loss.backward()
        monitor.step()
        optimizer.step()
    h = monitor.history()
    bias = h.names.index("0.bias")
    tiny = h.grad_norms[:, bias] / np.nanmax(h.grad_norms, axis=1)
    assert (tiny < monitor.thresholds.vanish_ratio).all(), "the scenario must have the tiny bias"
    assert monitor.diagnose() == []


# ---------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("device", DEVICES)
def test_nan_input_is_bad_input_at_its_step(device):
    model = small_mlp(device)
    monitor = GradMonitor(model)
    train_regression(model, monitor, steps=12, device=device, corrupt={7: "nan"})
    findings = monitor.diagnose()
    assert causes(findings)["bad_input"] == 7
    bad = next(f for f in findings if f.cause == "bad_input")
    assert bad.where == ("input[0]",)
    assert bad.evidence["nan"] == 1
    assert (bad.evidence["kind"], bad.evidence["features"]) == ("missing_values", (1,))
    assert causes(findings)["nonfinite_gradients"] == 7
    assert "fix the data first" in next(
        f.message for f in findings if f.cause == "nonfinite_gradients"
    )


def test_extreme_input_is_bad_input():
    model = small_mlp()
    monitor = GradMonitor(model)
    train_regression(model, monitor, steps=20, corrupt={12: "huge"})
    bad = [f for f in monitor.diagnose() if f.cause == "bad_input"]
    assert [f.step for f in bad] == [12]
    assert bad[0].evidence["max_abs"] > monitor.thresholds.input_abs_limit
    assert "RobustScaler" in bad[0].advice


def test_input_jump_relative_to_its_own_scale():
    """Inputs of scale 1e-3 that jump to 1 are extreme for that input although under the limit:
    judged on the input as a whole without per-feature statistics, per feature with them."""
    model = small_mlp()
    whole, per_feature = GradMonitor(model, feature_dim=None), GradMonitor(model)
    for step in range(12):
        x = torch.randn(8, 4) * (1e-3 if step != 9 else 1.0)
        model(x).sum().backward()
        whole.step()
        per_feature.step()
    bad = [f for f in whole.diagnose() if f.cause == "bad_input"]
    assert [f.step for f in bad] == [9]
    assert bad[0].evidence["kind"] == "extreme"
    assert bad[0].evidence["max_abs"] / bad[0].evidence["typical_max_abs"] > 100
    (bad,) = [f for f in per_feature.diagnose() if f.cause == "bad_input"]
    assert (bad.step, bad.evidence["kind"]) == (9, "outliers")
    assert bad.evidence["ratio"] > per_feature.thresholds.outlier_factor


def test_bad_input_example():
    findings = load_example("nan_bad_input").train().diagnose()
    bad = [(f.step, f.where, tuple(f.evidence)) for f in findings if f.cause == "bad_input"]
    assert [step for step, _, _ in bad] == [15, 25]
    assert "max_abs" in bad[0][2]
    assert "nan" in bad[1][2]
    assert causes(findings)["nonfinite_gradients"] == 25


def test_keyword_and_nested_inputs_are_named():
    class TwoInputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(4, 1)

        def forward(self, pair, *, scale, ids):
            return self.linear(pair[0] + pair[1]) * scale + ids.sum()

    model = TwoInputs()
    monitor = GradMonitor(model)
    ones = torch.ones(2, 4)
    model((ones, ones), scale=torch.tensor([NAN]), ids=torch.arange(3))
    # Integer inputs (ids) are not watched: they cannot hold NaN/Inf.
    assert monitor.history().sites == ("input[0][0]", "input[0][1]", "input[scale]")
    bad = next(f for f in monitor.diagnose() if f.cause == "bad_input")
    assert bad.where == ("input[scale]",)


# ------------------------------------------------------------------- NaN/Inf gradients, forward


@pytest.mark.parametrize("device", DEVICES)
def test_nonfinite_gradient_names_the_parameter(device):
    model = small_mlp(device)
    monitor = GradMonitor(model)
    for step in range(8):
        set_grads(model, 1.0)
        if step == 4:
            model[2].bias.grad[1] = NAN
            model[2].bias.grad[0] = float("inf")
        monitor.step()
    assert_diagnosis(monitor.diagnose(), {"nonfinite_gradients": 4})
    (finding,) = monitor.diagnose()
    assert finding.where == ("2.bias",)
    assert (finding.evidence["nan"], finding.evidence["inf"]) == (1, 1)
    assert "watch_modules='all'" in finding.advice  # no module is watched yet


class SqrtOfShifted(nn.Module):
    """sqrt(x - 10): NaN for most finite inputs, as a bad custom layer would."""

    def forward(self, x):
        return torch.sqrt(x - 10)


@pytest.mark.parametrize("device", DEVICES)
def test_first_module_to_produce_nan_is_named(device):
    model = nn.Sequential(nn.Linear(4, 8), SqrtOfShifted(), nn.Linear(8, 2)).to(device)
    monitor = GradMonitor(model, watch_modules="all")
    model(torch.randn(16, 4, device=device))
    findings = monitor.diagnose()
    assert causes(findings) == {"nonfinite_activations": 0}
    assert findings[0].where == ("1",)
    assert "module 1 (SqrtOfShifted)" in findings[0].message
    assert "then module 2 (Linear)" in findings[0].message


class SharedActivation(nn.Module):
    """One ReLU called twice per forward, as in models that reuse self.act or self.dropout."""

    def __init__(self):
        super().__init__()
        self.first = nn.Linear(4, 8)
        self.bad = SqrtOfShifted()
        self.second = nn.Linear(8, 2)
        self.act = nn.ReLU()

    def forward(self, x):
        return self.second(self.act(self.bad(self.act(self.first(x)))))


def test_a_reused_module_is_not_blamed_for_a_later_nan():
    """act runs before bad (finite output) and after it (NaN): bad is the first producer."""
    model = SharedActivation()
    monitor = GradMonitor(model, watch_modules="all")
    model(torch.randn(16, 4))
    (finding,) = monitor.diagnose()
    assert finding.where == ("bad",)
    assert "then module act (ReLU), module second (Linear)" in finding.message


def test_watching_listed_modules_only():
    model = nn.Sequential(nn.Linear(4, 8), SqrtOfShifted(), nn.Linear(8, 2))
    monitor = GradMonitor(model, watch_inputs=False, watch_modules=["2", model[0]])
    model(torch.randn(16, 4))
    assert monitor.history().sites == ("0", "2")
    assert [f.where for f in monitor.diagnose()] == [("2",)]


def test_nan_input_is_not_blamed_on_a_module():
    model = small_mlp()
    monitor = GradMonitor(model, watch_modules="all")
    x = torch.randn(16, 4)
    x[0, 0] = NAN
    model(x)
    assert causes(monitor.diagnose()) == {"bad_input": 0}
