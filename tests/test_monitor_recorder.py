"""GradMonitor's recording: step indexing, ring buffers, the optimizer contract, arguments and
thresholds, hooks, no host read-back, report, scalars and plot."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from monitor_helpers import (
    NAN,
    RTOL,
    causes,
    host_reads_forbidden,
    set_grads,
    small_mlp,
)
from torch import nn

from gradstats import GradMonitor, MonitorThresholds, grad_stats

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
        ({"window": 2.5}, "window must be an integer >= 2"),
        ({"norm_type": float("nan")}, "norm_type"),
        ({"max_norm": -1.0}, "max_norm"),
        ({"watch_modules": "some"}, "watch_modules must be None, 'all'"),
        ({"watch_modules": ["9"]}, "no module named '9'"),
        ({"watch_modules": [nn.Linear(1, 1)]}, "not part of the model"),
    ],
)
def test_constructor_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GradMonitor(small_mlp(), **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"explode_factor": 1.0}, "explode_factor must be > 1"),
        ({"explode_abs_limit": math.inf}, "explode_abs_limit must be > 0"),
        ({"vanish_ratio": 0.0}, r"vanish_ratio must be in \(0, 1\)"),
        ({"vanish_ratio": 1.0}, r"vanish_ratio must be in \(0, 1\)"),
        ({"vanish_steps": 0}, "vanish_steps must be an integer >= 1"),
        ({"growth_steps": True}, "growth_steps must be an integer >= 1"),
        ({"min_history": 2.0}, "min_history must be an integer >= 1"),
        ({"clip_percentile": 0}, r"clip_percentile must be in \(0, 100\]"),
        ({"clip_percentile": 100.5}, r"clip_percentile must be in \(0, 100\]"),
        ({"input_abs_limit": "1e4"}, "input_abs_limit must be > 0"),
    ],
)
def test_thresholds_are_checked_when_made(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MonitorThresholds(**kwargs)


def test_thresholds_have_defaults_and_are_frozen():
    th = MonitorThresholds(explode_factor=1e3)
    assert th.explode_factor == 1e3
    assert th.vanish_steps == MonitorThresholds().vanish_steps == 10
    assert MonitorThresholds(clip_percentile=100).clip_percentile == 100  # the closed end
    with pytest.raises(AttributeError):
        th.explode_factor = 5.0
    monitor = GradMonitor(small_mlp(), thresholds=th)
    assert monitor.thresholds is th
    assert GradMonitor(small_mlp()).thresholds == MonitorThresholds()
    with pytest.raises(TypeError, match="must be a MonitorThresholds"):
        GradMonitor(small_mlp(), thresholds={"explode_factor": 1e3})


def test_threshold_keywords_still_work_with_a_deprecation_warning():
    with pytest.warns(DeprecationWarning, match=r"MonitorThresholds\(explode_factor=1000.0\)"):
        monitor = GradMonitor(small_mlp(), explode_factor=1e3)
    assert monitor.thresholds == MonitorThresholds(explode_factor=1e3)
    base = MonitorThresholds(vanish_steps=3)
    with pytest.warns(DeprecationWarning, match="deprecated"):
        monitor = GradMonitor(small_mlp(), thresholds=base, vanish_ratio=1e-3)
    assert monitor.thresholds == MonitorThresholds(vanish_steps=3, vanish_ratio=1e-3)
    with pytest.warns(DeprecationWarning), pytest.raises(ValueError, match="explode_factor"):
        GradMonitor(small_mlp(), explode_factor=0.5)  # still checked


def test_unknown_keywords_are_type_errors():
    with pytest.raises(TypeError, match="unexpected keyword arguments: explode"):
        GradMonitor(small_mlp(), explode=1e3)


def test_constructor_needs_a_module_with_trainable_parameters():
    with pytest.raises(TypeError, match=r"torch\.nn\.Module"):
        GradMonitor([nn.Parameter(torch.ones(1))])
    with pytest.raises(ValueError, match="no parameter that requires grad"):
        GradMonitor(nn.ReLU())


# ------------------------------------------------------------------------------ hooks


def test_close_stops_the_hooks():
    """After close() no forward is recorded: the sites seen stay those seen before, and a NaN input
    or output is no longer found."""
    model = small_mlp()
    with GradMonitor(model, watch_modules="all") as monitor:
        assert monitor.watching
        model(torch.randn(2, 4))
        assert monitor.history().sites == ("input[0]", "0", "1", "2")
        assert np.isfinite(monitor.history().site_max_abs[-1]).all()
    assert not monitor.watching
    set_grads(model, 1.0)
    monitor.step()
    model(torch.full((2, 4), NAN))
    h = monitor.history()
    assert h.sites == ("input[0]", "0", "1", "2")
    assert np.isnan(h.site_max_abs[-1]).all(), "the forward after close() was recorded"
    assert monitor.diagnose() == []
    assert "hooks=off" in repr(monitor)


def test_close_check_can_fail():
    """The same forward with the hooks on is recorded, and its NaN found."""
    model = small_mlp()
    monitor = GradMonitor(model, watch_modules="all")
    set_grads(model, 1.0)
    monitor.step()
    model(torch.full((2, 4), NAN))
    assert not np.isnan(monitor.history().site_max_abs[-1]).all()
    assert causes(monitor.diagnose()) == {"bad_input": 1}


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
    assert monitor.device.type == "cuda"
    assert monitor.scalars()["gradstats/total_norm"] > 0


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
