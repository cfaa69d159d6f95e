"""GradMonitor: the three causes and the healthy case, step indexing, ring buffer, hooks, report,
plot, scalars, and no host read-back in step()."""

from __future__ import annotations

import contextlib
import importlib.util
import math
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import DEVICES
from torch import nn

import gradstats
from gradstats import GradMonitor, grad_stats

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
NAN = float("nan")
# Relative tolerance of numbers read back from the float64 ring buffers against the test's own.
RTOL = 1e-6
# Tensor methods that copy a value to the host (and, on a GPU, wait for the device).
HOST_READS = ("item", "tolist", "numpy", "cpu", "__bool__", "__float__", "__int__", "__index__")


def small_mlp(device: str = "cpu") -> nn.Sequential:
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)).to(device)


def set_grads(model: nn.Module, norms: dict[str, float] | float) -> None:
    """Gives every parameter a constant gradient whose L2 norm is norms[name] (or norms)."""
    for name, p in model.named_parameters():
        norm = norms[name] if isinstance(norms, dict) else norms
        p.grad = torch.full_like(p, norm / math.sqrt(p.numel()))


def causes(findings: list[gradstats.Finding]) -> dict[str, int]:
    return {f.cause: f.step for f in findings}


def assert_diagnosis(findings: list[gradstats.Finding], expected: dict[str, int]) -> None:
    """The findings are exactly the expected causes, each first seen at the expected step."""
    got = causes(findings)
    assert got == expected, "diagnosis differs:\n" + "\n".join(map(str, findings))


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def host_reads_forbidden() -> Iterator[None]:
    """Any copy of a tensor value to the host raises while this is active."""

    def forbidden(name):
        def read(*args, **kwargs):
            raise AssertionError(f"Tensor.{name}() read a value back to the host")

        return read

    saved = {name: getattr(torch.Tensor, name) for name in HOST_READS}
    try:
        for name in HOST_READS:
            setattr(torch.Tensor, name, forbidden(name))
        yield
    finally:
        for name, method in saved.items():
            setattr(torch.Tensor, name, method)


@contextlib.contextmanager
def counting_host_reads() -> Iterator[dict[str, int]]:
    counts = dict.fromkeys(HOST_READS, 0)
    saved = {name: getattr(torch.Tensor, name) for name in HOST_READS}

    def counted(name):
        def read(self, *args, **kwargs):
            counts[name] += 1
            return saved[name](self, *args, **kwargs)

        return read

    try:
        for name in HOST_READS:
            setattr(torch.Tensor, name, counted(name))
        yield counts
    finally:
        for name, method in saved.items():
            setattr(torch.Tensor, name, method)


def train_regression(
    model: nn.Module,
    monitor: GradMonitor,
    steps: int,
    device: str = "cpu",
    corrupt: dict[int, str] | None = None,
) -> None:
    """Adam on a linear target; corrupt[step] = "nan" or "huge" spoils that step's batch."""
    corrupt = corrupt or {}
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    weights = torch.randn(4, 2, device=device)
    for step in range(steps):
        x = torch.randn(16, 4, device=device)
        y = x @ weights
        if corrupt.get(step) == "nan":
            x[3, 1] = NAN
        elif corrupt.get(step) == "huge":
            x[:, 0] *= 1e7
        loss = nn.functional.mse_loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        monitor.step()
        optimizer.step()


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


def exploding_run(device: str, jump_step: int = 20, jump: float = 4.4e16) -> GradMonitor:
    model = small_mlp(device)
    monitor = GradMonitor(model)
    for step in range(jump_step + 5):
        healthy = {
            name: 1.0 + 0.1 * math.sin(step + i)
            for i, (name, _) in enumerate(model.named_parameters())
        }
        if step == jump_step:
            healthy["2.weight"] = jump
        set_grads(model, healthy)
        monitor.step()
    return monitor


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
    monitor = GradMonitor(model, explode_factor=1e12)  # only the growth rule can fire
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
    monitor = GradMonitor(model, explode_factor=1e12, explode_abs_limit=1e30)
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
    monitor = GradMonitor(model, vanish_steps=10)
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
    assert bad.evidence["inf"] == 0
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
    """Inputs of scale 1e-3 that jump to 1 are extreme for that input although under the limit."""
    model = small_mlp()
    monitor = GradMonitor(model)
    for step in range(12):
        x = torch.randn(8, 4) * (1e-3 if step != 9 else 1.0)
        model(x).sum().backward()
        monitor.step()
    bad = [f for f in monitor.diagnose() if f.cause == "bad_input"]
    assert [f.step for f in bad] == [9]
    assert bad[0].evidence["max_abs"] / bad[0].evidence["typical_max_abs"] > 100


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


# ---------------------------------------------------------------- step indexing, ring buffer


def test_observations_before_the_first_step_belong_to_step_0():
    model = small_mlp()
    monitor = GradMonitor(model)
    bad = torch.full((2, 4), NAN)
    model(bad)
    assert monitor.diagnose()[0].step == 0
    for _ in range(3):
        model(torch.randn(2, 4)).sum().backward()
        monitor.step()
    assert monitor.num_steps == 3
    monitor2 = GradMonitor(model)
    for _ in range(3):
        model(torch.randn(2, 4)).sum().backward()
        monitor2.step()
    model(bad)
    assert [f.step for f in monitor2.diagnose() if f.cause == "bad_input"] == [3]


def test_ring_buffer_wraps_and_keeps_the_first_nan():
    model = small_mlp()
    monitor = GradMonitor(model, window=4)
    for step in range(10):
        x = torch.randn(2, 4)
        if step == 2:
            x[0, 0] = NAN
        model(x)
        set_grads(model, float(step + 1))
        if step == 1:
            model[0].weight.grad[0, 0] = NAN
        monitor.step()
    h = monitor.history()
    assert h.steps.tolist() == [6, 7, 8, 9]
    # Each parameter's norm is step + 1 and there are four of them: total = 2 * (step + 1).
    np.testing.assert_allclose(h.total_norm, [14.0, 16.0, 18.0, 20.0], rtol=RTOL)
    np.testing.assert_allclose(h.grad_norms[:, 0], [7.0, 8.0, 9.0, 10.0], rtol=RTOL)
    assert h.site_steps.tolist() == [7, 8, 9, 10]
    found = causes(monitor.diagnose())
    assert found == {"nonfinite_gradients": 1, "bad_input": 2}
    old = next(f for f in monitor.diagnose() if f.cause == "nonfinite_gradients")
    assert old.where == ("0.weight",)
    assert "before the kept window" in old.message


def test_site_columns_grow_past_their_first_allocation():
    class ManyInputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(4, 1)

        def forward(self, *xs):
            return self.linear(sum(xs))

    model = ManyInputs()
    monitor = GradMonitor(model, window=3)
    model(torch.ones(1, 4))
    model(*[torch.full((1, 4), float(i + 1)) for i in range(5)])
    h = monitor.history()
    assert h.sites == tuple(f"input[{i}]" for i in range(5))
    np.testing.assert_allclose(h.site_max_abs[-1], [1.0, 2.0, 3.0, 4.0, 5.0])


# ----------------------------------------------------------------- contract with the optimizer


def test_step_with_given_stats_matches_its_own_pass():
    model = small_mlp()
    params = list(model.parameters())
    own, given = GradMonitor(model), GradMonitor(model)
    for _ in range(3):
        model(torch.randn(8, 4)).pow(2).sum().backward()
        own.step()
        given.step(stats=grad_stats(params, max_norm=0.5), params=params)
        model.zero_grad()
    a, b = own.history(), given.history()
    np.testing.assert_allclose(a.grad_norms, b.grad_norms, rtol=RTOL)
    np.testing.assert_allclose(a.total_norm, b.total_norm, rtol=RTOL)
    assert (b.clip_coef < 1).all() and (a.clip_coef == 1).all()


def test_step_maps_params_to_names_by_identity():
    model = small_mlp()
    monitor = GradMonitor(model)
    set_grads(model, {"0.weight": 1.0, "0.bias": 2.0, "2.weight": 3.0, "2.bias": 4.0})
    subset = [model[2].bias, model[0].weight]  # not in model order, and not all of them
    monitor.step(stats=grad_stats(subset), params=subset)
    values = monitor.scalars()
    assert values["gradstats/grad_norm/2.bias"] == pytest.approx(4.0, rel=RTOL)
    assert values["gradstats/grad_norm/0.weight"] == pytest.approx(1.0, rel=RTOL)
    assert math.isnan(values["gradstats/grad_norm/0.bias"])  # no statistics this step


def test_parameters_outside_the_model_are_left_out_with_a_warning():
    """An optimizer may hold a parameter the model does not (a learnable loss weight): the monitor
    records the others and does not stop training."""
    model = small_mlp()
    monitor = GradMonitor(model)
    set_grads(model, {"0.weight": 1.0, "0.bias": 2.0, "2.weight": 3.0, "2.bias": 4.0})
    stranger = nn.Parameter(torch.ones(3))
    stranger.grad = torch.full((3,), NAN)
    params = [model[0].bias, stranger, model[2].weight]
    with pytest.warns(UserWarning, match=r"1 of the 3 parameters given \(shapes \(3,\)\)"):
        monitor.step(stats=grad_stats(params), params=params)
    values = monitor.scalars()
    assert values["gradstats/grad_norm/0.bias"] == pytest.approx(2.0, rel=RTOL)
    assert values["gradstats/grad_norm/2.weight"] == pytest.approx(3.0, rel=RTOL)
    assert math.isnan(values["gradstats/grad_norm/0.weight"])
    assert values["gradstats/nonfinite_grads"] == 0  # the stranger's NaN is not the model's
    assert math.isnan(values["gradstats/total_norm"])  # but the total covers what was given


def test_skipped_steps_are_recorded():
    model = small_mlp()
    monitor = GradMonitor(model)
    set_grads(model, 1.0)
    monitor.step(skipped=torch.tensor(True))
    monitor.step(skipped=False)
    monitor.step()
    h = monitor.history()
    assert h.skipped[:2].tolist() == [1.0, 0.0]
    assert math.isnan(h.skipped[2])


def test_step_rejects_bad_arguments():
    model = small_mlp()
    monitor = GradMonitor(model)
    with pytest.raises(RuntimeError, match=r"after loss\.backward"):
        monitor.step()
    set_grads(model, 1.0)
    params = list(model.parameters())
    with pytest.raises(ValueError, match="cover 4 tensors but 3 parameters"):
        monitor.step(stats=grad_stats(params), params=params[:3])
    with pytest.raises(ValueError, match="per_tensor=True"):
        monitor.step(stats=grad_stats(params, per_tensor=False), params=params)
    with pytest.raises(TypeError, match="GradStats"):
        monitor.step(stats=(1, 2), params=params)
    assert monitor.num_steps == 0  # nothing was recorded by the failed calls


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"window": 1}, "window must be an integer >= 2"),
        ({"explode_factor": 1.0}, "explode_factor must be > 1"),
        ({"vanish_ratio": 0.0}, r"vanish_ratio must be in \(0, 1\)"),
        ({"vanish_steps": 0}, "vanish_steps must be an integer >= 1"),
        ({"clip_percentile": 0}, "clip_percentile"),
        ({"norm_type": 0}, "norm_type"),
        ({"max_norm": -1.0}, "max_norm"),
        ({"watch_modules": "some"}, "watch_modules must be None, 'all'"),
        ({"watch_modules": ["9"]}, "no module named '9'"),
        ({"watch_modules": [nn.Linear(1, 1)]}, "not part of the model"),
    ],
)
def test_constructor_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GradMonitor(small_mlp(), **kwargs)


def test_constructor_needs_a_module_with_trainable_parameters():
    with pytest.raises(TypeError, match=r"torch\.nn\.Module"):
        GradMonitor([nn.Parameter(torch.ones(1))])
    with pytest.raises(ValueError, match="no parameter that requires grad"):
        GradMonitor(nn.ReLU())


# ------------------------------------------------------------------------------ hooks


def test_close_removes_the_hooks():
    model = small_mlp()
    with GradMonitor(model, watch_modules="all") as monitor:
        assert len(model._forward_pre_hooks) == 1
        assert all(len(m._forward_hooks) == 1 for m in model)
    assert len(model._forward_pre_hooks) == 0
    assert all(len(m._forward_hooks) == 0 for m in model)
    model(torch.full((2, 4), NAN))
    assert monitor.diagnose() == []
    assert "hooks=off" in repr(monitor)


# --------------------------------------------------------------------- no host read-back


def test_step_and_hooks_read_nothing_back():
    model = small_mlp()
    monitor = GradMonitor(model, watch_modules="all")
    x, y = torch.randn(8, 4), torch.randn(8, 2)
    with host_reads_forbidden():
        for _ in range(monitor.window + 2):  # past a wrap of the ring buffer
            loss = nn.functional.mse_loss(model(x), y)
            model.zero_grad()
            loss.backward()
            monitor.step()
            monitor.step(stats=grad_stats(list(model.parameters())))
            subset = [model[2].weight, model[0].bias]  # the index_copy_ path
            monitor.step(stats=grad_stats(subset), params=subset)
    assert monitor.num_steps == 3 * (monitor.window + 2)


def test_host_read_guard_can_fail():
    """The guard above would catch a read: scalars() reads back and trips it."""
    model = small_mlp()
    monitor = GradMonitor(model)
    set_grads(model, 1.0)
    monitor.step()
    with host_reads_forbidden(), pytest.raises(AssertionError, match="read a value back"):
        monitor.scalars()


@pytest.mark.gpu
def test_step_and_hooks_do_not_synchronize_cuda():
    model = small_mlp("cuda")
    monitor = GradMonitor(model, watch_modules="all")
    x, y = torch.randn(8, 4, device="cuda"), torch.randn(8, 2, device="cuda")

    def train_step():
        loss = nn.functional.mse_loss(model(x), y)
        model.zero_grad()
        loss.backward()
        monitor.step()

    train_step()  # allocates the rings and index tensors (host-to-device copies, once)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            train_step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert monitor.num_steps == 4


@pytest.mark.gpu
def test_rings_follow_the_model_moved_after_the_monitor_was_made():
    model = small_mlp()
    monitor = GradMonitor(model)
    model.to("cuda")
    model(torch.randn(2, 4).cuda()).sum().backward()
    monitor.step()
    assert monitor._grad_ring.device.type == "cuda"
    assert monitor.scalars()["gradstats/total_norm"] > 0


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
    assert sum(reads.values()) == 1
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


def test_forwards_under_inference_mode_and_no_grad_are_watched():
    """Buffers made during an inference_mode forward (say a first validation pass) stay usable."""
    model = small_mlp()
    monitor = GradMonitor(model, watch_modules="all")
    with torch.inference_mode():
        model(torch.randn(3, 4))
    model(torch.randn(3, 4)).sum().backward()
    monitor.step()
    bad = torch.randn(3, 4)
    bad[0, 0] = NAN
    with torch.inference_mode():
        model(bad)
    with torch.no_grad():
        model(torch.randn(3, 4))
    assert causes(monitor.diagnose()) == {"bad_input": 1}


# --------------------------------------------------------------- several forwards per step


def test_gradient_accumulation_adds_up_within_a_step():
    model = small_mlp()
    monitor = GradMonitor(model)
    for micro in range(3):
        x = torch.ones(2, 4) * (micro + 1)
        if micro == 2:
            x[0, 0] = NAN
        model(x).sum().backward()
    monitor.step()
    h = monitor.history()
    assert h.site_max_abs[0, 0] == 3.0
    assert h.site_nan[0, 0] == 1
    assert causes(monitor.diagnose())["bad_input"] == 0
