"""ClipGradOptimizer and AdaptiveClip against clip_grad_norm_ + the same optimizer (gradstats' and
torch's), with NaN injection, every on_nonfinite policy, schedulers, state dicts, GradScaler,
closures, hooks and torch.compile."""

from __future__ import annotations

import copy
import io
import math
import re
import warnings
from collections.abc import Callable

import pytest
import torch
from helpers import DEVICES
from torch import nn

import gradstats
from gradstats.bench.reads import counting_host_reads
from gradstats.optim import STATE_KEY

STEPS = 24
NAN_STEP = 7
MAX_NORM = 1.0
BATCH, IN, HIDDEN, OUT = 16, 8, 16, 4
# Every CLIP_EVERY-th batch has large targets, so its gradient norm (~2) is clipped by MAX_NORM and
# the others (~0.4) are not: both branches of the clip run in every comparison.
CLIP_EVERY, LARGE_TARGET, SMALL_TARGET = 3, 3.0, 0.5
MODEL_SEED, DATA_SEED = 0, 1
# The fused kernels divide by grad_scale = 1 / coef where clip_grad_norm_ multiplies by coef: one
# rounding apart per clipped gradient, which Adam's normalisation carries through 24 steps.
FUSED_TOL = {"rtol": 1e-5, "atol": 1e-6}
# torch.nn.utils.clip_grad_norm_ accumulates the norm in float32 (gradstats in float64).
TORCH_TOL = {"rtol": 1e-4, "atol": 1e-5}

OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "adamw-fused": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.01, fused=True),
    "adamw-foreach": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.01, foreach=True),
    "adamw-forloop": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.01, foreach=False),
    "adam-fused": lambda p: torch.optim.Adam(p, lr=1e-2, fused=True),
    "adam-foreach": lambda p: torch.optim.Adam(p, lr=1e-2, foreach=True),
    "adam-forloop": lambda p: torch.optim.Adam(p, lr=1e-2, foreach=False),
    "sgd-momentum-fused": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, fused=True),
    "sgd-momentum-foreach": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, foreach=True),
    "sgd-momentum-forloop": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, foreach=False),
}
FUSED = [name for name in OPTIMIZERS if name.endswith("fused")]
NOT_FUSED = [name for name in OPTIMIZERS if not name.endswith("fused")]


def make_model(device: str) -> nn.Module:
    torch.manual_seed(MODEL_SEED)
    return nn.Sequential(nn.Linear(IN, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, OUT)).to(device)


def make_batches(device: str, steps: int = STEPS) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(DATA_SEED)
    batches = []
    for i in range(steps):
        x = torch.randn(BATCH, IN, generator=g)
        y = torch.randn(BATCH, OUT, generator=g)
        y = y * (LARGE_TARGET if i % CLIP_EVERY == 0 else SMALL_TARGET)
        batches.append((x.to(device), y.to(device)))
    return batches


def backward(model: nn.Module, batch, poison: float | None = None) -> torch.Tensor:
    x, y = batch
    loss = nn.functional.mse_loss(model(x), y)
    loss.backward()
    if poison is not None:
        with torch.no_grad():
            model[0].weight.grad[0, 0] = poison
    return loss


def clip_with(kind: str, params, max_norm: float = MAX_NORM, **kwargs) -> torch.Tensor:
    if kind == "gradstats":
        return gradstats.clip_grad_norm_(params, max_norm, **kwargs)
    return torch.nn.utils.clip_grad_norm_(params, max_norm, **kwargs)


def train_reference(
    device: str, opt_name: str, kind: str = "gradstats", skip=(), max_norm: float = MAX_NORM
):
    """clip_grad_norm_ + step(); the batches in `skip` are left out (what a skipped step is)."""
    model = make_model(device)
    opt = OPTIMIZERS[opt_name](model.parameters())
    norms = []
    for i, batch in enumerate(make_batches(device)):
        if i in skip:
            continue
        opt.zero_grad()
        backward(model, batch)
        norms.append(clip_with(kind, model.parameters(), max_norm))
        opt.step()
    return model, opt, norms


def train_wrapped(device: str, opt_name: str, poison_at=(), **kwargs):
    model = make_model(device)
    opt = gradstats.ClipGradOptimizer(
        OPTIMIZERS[opt_name](model.parameters()), kwargs.pop("max_norm", MAX_NORM), **kwargs
    )
    norms, coefs = [], []
    for i, batch in enumerate(make_batches(device)):
        opt.zero_grad()
        backward(model, batch, math.nan if i in poison_at else None)
        opt.step()
        norms.append(opt.last_stats.total_norm)
        coefs.append(opt.last_stats.clip_coef)
    return model, opt, norms, coefs


def bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes, so that NaN == NaN and -0.0 != 0.0: a bitwise comparison."""
    return t.detach().contiguous().view(-1).view(torch.uint8)


def assert_bitwise_equal(a: torch.Tensor, b: torch.Tensor, what: str = "tensor") -> None:
    assert a.dtype == b.dtype and a.shape == b.shape, (
        f"{what}: {a.dtype}{a.shape} vs {b.dtype}{b.shape}"
    )
    assert torch.equal(bits(a), bits(b)), f"{what} differs bitwise"


def snapshot(model: nn.Module, opt: torch.optim.Optimizer) -> dict:
    """Deep copies of parameters, gradients and optimizer state, to compare after a step."""
    return {
        "params": [p.detach().clone() for p in model.parameters()],
        "grads": [None if p.grad is None else p.grad.clone() for p in model.parameters()],
        "state": copy.deepcopy(opt.state_dict()["state"]),
    }


def assert_unchanged(before: dict, after: dict) -> None:
    for i, (a, b) in enumerate(zip(before["params"], after["params"])):
        assert_bitwise_equal(a, b, f"parameter {i}")
    for i, (a, b) in enumerate(zip(before["grads"], after["grads"])):
        assert (a is None) == (b is None), f"grad {i} appeared or vanished"
        if a is not None:
            assert_bitwise_equal(a, b, f"grad {i}")
    assert before["state"].keys() == after["state"].keys(), "optimizer state gained/lost entries"
    for key, state in before["state"].items():
        assert state.keys() == after["state"][key].keys()
        for name, value in state.items():
            assert_bitwise_equal(value, after["state"][key][name], f"state[{key}][{name!r}]")


def assert_same_training(model_a, opt_a, model_b, opt_b, exact: bool, tol=FUSED_TOL) -> None:
    for i, (a, b) in enumerate(zip(model_a.parameters(), model_b.parameters())):
        if exact:
            assert_bitwise_equal(a, b, f"parameter {i}")
        else:
            torch.testing.assert_close(a, b, **tol, msg=lambda m, i=i: f"parameter {i}: {m}")
    state_a, state_b = opt_a.state_dict()["state"], opt_b.state_dict()["state"]
    assert state_a.keys() == state_b.keys()
    for key in state_a:
        for name, value in state_a[key].items():
            if exact or name == "step":
                assert_bitwise_equal(value, state_b[key][name], f"state[{key}][{name!r}]")
            else:
                torch.testing.assert_close(value, state_b[key][name], **tol)


# --- the wrapper equals clip_grad_norm_ + step() -------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
def test_matches_clip_grad_norm_then_step(device, opt_name):
    ref_model, ref_opt, ref_norms = train_reference(device, opt_name)
    model, opt, norms, coefs = train_wrapped(device, opt_name)
    clipped = sum(bool(c < 1) for c in coefs)
    assert 0 < clipped < STEPS, f"{clipped} of {STEPS} steps clipped: the test must exercise both"
    exact = opt_name in NOT_FUSED
    for i, (a, b) in enumerate(zip(norms, ref_norms)):
        if exact:
            assert_bitwise_equal(a, b, f"total norm of step {i}")
        else:
            torch.testing.assert_close(a, b, **FUSED_TOL)
    assert_same_training(model, opt, ref_model, ref_opt, exact=exact)
    assert int(opt.skipped_steps) == 0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
def test_matches_torch_clip_grad_norm(device, opt_name):
    ref_model, ref_opt, ref_norms = train_reference(device, opt_name, kind="torch")
    model, opt, norms, _ = train_wrapped(device, opt_name)
    torch.testing.assert_close(torch.stack(norms), torch.stack(ref_norms), **TORCH_TOL)
    assert_same_training(model, opt, ref_model, ref_opt, exact=False, tol=TORCH_TOL)


@pytest.mark.parametrize("device", DEVICES)
def test_comparison_can_fail(device):
    """The comparisons above are not vacuous: a 10% different max_norm is caught."""
    ref_model, ref_opt, _ = train_reference(device, "adamw-forloop", max_norm=MAX_NORM * 1.1)
    model, opt, _, _ = train_wrapped(device, "adamw-forloop")
    with pytest.raises(AssertionError, match="differs bitwise"):
        assert_same_training(model, opt, ref_model, ref_opt, exact=True)
    with pytest.raises(AssertionError):
        assert_same_training(model, opt, ref_model, ref_opt, exact=False, tol=TORCH_TOL)


def test_is_an_optimizer_sharing_the_inner_containers():
    model = make_model("cpu")
    inner = torch.optim.AdamW(model.parameters(), lr=1e-3)
    opt = gradstats.ClipGradOptimizer(inner, max_norm=MAX_NORM)
    assert isinstance(opt, torch.optim.Optimizer)
    assert opt.param_groups is inner.param_groups
    assert opt.state is inner.state
    assert opt.defaults is inner.defaults
    assert "AdamW" in repr(opt) and "max_norm=1.0" in repr(opt)


# --- non-finite gradients ------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
@pytest.mark.parametrize("nan_step", [0, NAN_STEP], ids=["first-step", "mid-training"])
def test_skip_leaves_everything_unchanged_and_training_continues(device, opt_name, nan_step):
    model = make_model(device)
    opt = gradstats.ClipGradOptimizer(OPTIMIZERS[opt_name](model.parameters()), MAX_NORM)
    for i, batch in enumerate(make_batches(device)):
        opt.zero_grad()
        backward(model, batch, math.nan if i == nan_step else None)
        before = snapshot(model, opt)
        opt.step()
        if i == nan_step:
            assert_unchanged(before, snapshot(model, opt))
            assert bool(opt.last_stats.nan_count == 1)
        else:
            assert not torch.equal(before["params"][0], model[0].weight), f"step {i} not taken"
    assert int(opt.skipped_steps) == 1
    ref_model, ref_opt, _ = train_reference(device, opt_name, skip={nan_step})
    assert_same_training(model, opt, ref_model, ref_opt, exact=opt_name in NOT_FUSED)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("opt_name", ["adamw-fused", "adamw-forloop", "sgd-momentum-foreach"])
@pytest.mark.parametrize("bad", [math.inf, -math.inf], ids=["inf", "-inf"])
def test_skip_on_inf(device, opt_name, bad):
    model = make_model(device)
    opt = gradstats.ClipGradOptimizer(OPTIMIZERS[opt_name](model.parameters()), MAX_NORM)
    batches = make_batches(device)
    for i in range(NAN_STEP):
        opt.zero_grad()
        backward(model, batches[i])
        opt.step()
    opt.zero_grad()
    backward(model, batches[NAN_STEP], bad)
    before = snapshot(model, opt)
    opt.step()
    assert_unchanged(before, snapshot(model, opt))
    assert int(opt.skipped_steps) == 1 and bool(opt.last_stats.inf_count == 1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("opt_name", ["adamw-fused", "adam-foreach", "sgd-momentum-fused"])
def test_zero_policy_matches_clip_grad_norm_zero(device, opt_name):
    poison = {NAN_STEP, NAN_STEP + 1}
    model, opt, _, _ = train_wrapped(device, opt_name, poison_at=poison, on_nonfinite="zero")
    ref_model = make_model(device)
    ref_opt = OPTIMIZERS[opt_name](ref_model.parameters())
    for i, batch in enumerate(make_batches(device)):
        ref_opt.zero_grad()
        backward(ref_model, batch, math.nan if i in poison else None)
        gradstats.clip_grad_norm_(ref_model.parameters(), MAX_NORM, on_nonfinite="zero")
        ref_opt.step()
    assert int(opt.skipped_steps) == 0
    assert int(opt.consecutive_nonfinite) == 0, "finite steps after the NaNs reset the run"
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert_same_training(model, opt, ref_model, ref_opt, exact=opt_name in NOT_FUSED)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("opt_name", ["adamw-fused", "adamw-forloop"])
def test_propagate_policy_is_torchs_behaviour(device, opt_name):
    model = make_model(device)
    opt = gradstats.ClipGradOptimizer(
        OPTIMIZERS[opt_name](model.parameters()), MAX_NORM, on_nonfinite="propagate"
    )
    ref_model = make_model(device)
    ref_opt = OPTIMIZERS[opt_name](ref_model.parameters())
    batch = make_batches(device)[0]
    backward(model, batch, math.nan)
    opt.step()
    backward(ref_model, batch, math.nan)
    torch.nn.utils.clip_grad_norm_(ref_model.parameters(), MAX_NORM)
    ref_opt.step()
    for p, q in zip(model.parameters(), ref_model.parameters()):
        assert torch.isnan(p).all() and torch.isnan(q).all()
    assert int(opt.skipped_steps) == 0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("opt_name", ["adamw-fused", "sgd-momentum-forloop"])
def test_error_policy_raises_naming_the_parameter_and_changes_nothing(device, opt_name):
    model = make_model(device)
    opt = gradstats.ClipGradOptimizer(
        OPTIMIZERS[opt_name](model.named_parameters()), MAX_NORM, on_nonfinite="error"
    )
    batches = make_batches(device)
    backward(model, batches[0])
    opt.step()
    opt.zero_grad()
    backward(model, batches[1], math.nan)
    before = snapshot(model, opt)
    with pytest.raises(RuntimeError, match=r"0\.weight \(shape \(16, 8\).*1 NaN, 0 Inf"):
        opt.step()
    assert_unchanged(before, snapshot(model, opt))
    assert int(opt.skipped_steps) == 0 and int(opt.consecutive_nonfinite) == 0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("opt_name", ["adamw-fused", "adamw-foreach"])
def test_max_consecutive_nonfinite(device, opt_name):
    limit = 3
    model = make_model(device)
    opt = gradstats.ClipGradOptimizer(
        OPTIMIZERS[opt_name](model.parameters()), MAX_NORM, max_consecutive_nonfinite=limit
    )
    batches = make_batches(device)

    def step(i: int, poison: float | None) -> None:
        opt.zero_grad()
        backward(model, batches[i], poison)
        opt.step()

    step(0, None)
    step(1, math.nan)
    step(2, math.nan)
    assert (int(opt.skipped_steps), int(opt.consecutive_nonfinite)) == (2, 2)
    opt.zero_grad()
    backward(model, batches[3], math.inf)
    before = snapshot(model, opt)
    expected = r"(?s)3 consecutive steps \(max_consecutive_nonfinite=3\).*param_groups\[0\]\[0\]"
    with pytest.raises(RuntimeError, match=expected):
        opt.step()
    assert_unchanged(before, snapshot(model, opt))
    assert (int(opt.skipped_steps), int(opt.consecutive_nonfinite)) == (2, 2)
    step(4, None)
    assert int(opt.consecutive_nonfinite) == 0
    step(5, math.nan)
    assert (int(opt.skipped_steps), int(opt.consecutive_nonfinite)) == (3, 1)


# --- schedulers, hooks, closures, param groups ---------------------------------------------------

SCHEDULERS = {
    "StepLR": lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=5, gamma=0.5),
    "OneCycleLR": lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.05, total_steps=STEPS),
    "LambdaLR": lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda s: 1.0 / (1 + s)),
    "CosineAnnealingLR": lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=STEPS),
}


@pytest.mark.parametrize("sched_name", list(SCHEDULERS))
@pytest.mark.parametrize("opt_name", ["adamw-fused", "sgd-momentum-foreach"])
def test_schedulers_without_warnings(sched_name, opt_name):
    model = make_model("cpu")
    ref_model = make_model("cpu")
    ref_opt = OPTIMIZERS[opt_name](ref_model.parameters())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt = gradstats.ClipGradOptimizer(OPTIMIZERS[opt_name](model.parameters()), MAX_NORM)
        sched = SCHEDULERS[sched_name](opt)
        ref_sched = SCHEDULERS[sched_name](ref_opt)
        for i, batch in enumerate(make_batches("cpu")):
            opt.zero_grad()
            backward(model, batch, math.nan if i in (0, NAN_STEP) else None)
            opt.step()
            sched.step()
            ref_opt.step()
            ref_sched.step()
            assert opt.param_groups[0]["lr"] == ref_opt.param_groups[0]["lr"]
    assert int(opt.skipped_steps) == 2


def test_step_hooks():
    model = make_model("cpu")
    inner = OPTIMIZERS["adamw-forloop"](model.parameters())
    opt = gradstats.ClipGradOptimizer(inner, MAX_NORM)
    calls = []
    opt.register_step_pre_hook(lambda o, args, kwargs: calls.append(("pre", o)))
    handle = opt.register_step_post_hook(lambda o, args, kwargs: calls.append(("post", o)))
    inner.register_step_post_hook(lambda o, args, kwargs: calls.append(("inner", o)))
    batches = make_batches("cpu")
    backward(model, batches[0])
    opt.step()
    assert calls == [("pre", opt), ("inner", inner), ("post", opt)]
    calls.clear()
    opt.zero_grad()
    backward(model, batches[1], math.nan)
    opt.step()
    assert calls == [("pre", opt), ("post", opt)], "a skipped step does not run the inner step"
    handle.remove()
    calls.clear()
    opt.step()
    assert calls == [("pre", opt)]


@pytest.mark.parametrize("opt_name", ["adamw-fused", "sgd-momentum-forloop"])
def test_closure(opt_name):
    ref_model, ref_opt, _ = train_reference("cpu", opt_name)
    model = make_model("cpu")
    opt = gradstats.ClipGradOptimizer(OPTIMIZERS[opt_name](model.parameters()), MAX_NORM)
    for batch in make_batches("cpu"):

        def closure(batch=batch):
            opt.zero_grad()
            return backward(model, batch)

        loss = opt.step(closure)
        assert isinstance(loss, torch.Tensor) and loss.requires_grad
    assert_same_training(model, opt, ref_model, ref_opt, exact=opt_name in NOT_FUSED)


def test_add_param_group_and_zero_grad():
    model = make_model("cpu")
    first, second = model[0], model[2]
    opt = gradstats.ClipGradOptimizer(
        torch.optim.SGD(first.parameters(), lr=0.1, momentum=0.9), MAX_NORM
    )
    opt.add_param_group({"params": list(second.parameters()), "lr": 0.0})
    assert len(opt.optimizer.param_groups) == 2 and opt.param_groups[1]["momentum"] == 0.9
    frozen = second.weight.detach().clone()
    backward(model, make_batches("cpu")[0])
    opt.step()
    assert torch.equal(second.weight, frozen), "lr 0 in the added group"
    assert len(opt.last_stats.norms) == len(list(model.parameters()))
    opt.zero_grad(set_to_none=False)
    assert all(p.grad is not None and not p.grad.any() for p in model.parameters())
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())


def test_deepcopy():
    _, opt, _, _ = train_wrapped("cpu", "adamw-fused", poison_at={NAN_STEP})
    clone = copy.deepcopy(opt)
    assert clone.optimizer is not opt.optimizer
    assert clone.param_groups is clone.optimizer.param_groups
    assert int(clone.skipped_steps) == 1
    before = [p.detach().clone() for p in opt.param_groups[0]["params"]]
    for p in clone.param_groups[0]["params"]:
        p.grad = torch.ones_like(p)
    clone.step()
    assert all(torch.equal(a, b) for a, b in zip(before, opt.param_groups[0]["params"]))
    assert not torch.equal(before[0], clone.param_groups[0]["params"][0])


def test_step_without_gradients_is_a_no_op():
    model = make_model("cpu")
    opt = gradstats.ClipGradOptimizer(OPTIMIZERS["adamw-fused"](model.parameters()), MAX_NORM)
    before = snapshot(model, opt)
    opt.step()
    assert_unchanged(before, snapshot(model, opt))
    assert opt.last_stats is None
    assert opt.stats_dict() == {"skipped_steps": 0, "consecutive_nonfinite": 0}


# --- monitor and logging -------------------------------------------------------------------------


class RecordingMonitor:
    def __init__(self) -> None:
        self.calls: list[tuple[gradstats.GradStats, list[torch.Tensor], list[float]]] = []
        self.skipped: list[bool] = []

    def step(self, *, stats, params, skipped):
        norms_now = [float(p.grad.norm()) for p in params]
        self.calls.append((stats, params, norms_now))
        self.skipped.append(bool(skipped))


def test_monitor_gets_the_stats_and_the_params_in_order():
    model = make_model("cpu")
    model[0].bias.requires_grad_(False)
    monitor = RecordingMonitor()
    opt = gradstats.ClipGradOptimizer(
        OPTIMIZERS["adamw-fused"](model.parameters()), MAX_NORM, monitor=monitor
    )
    batches = make_batches("cpu")
    for i in range(3):
        opt.zero_grad()
        backward(model, batches[i], math.nan if i == 1 else None)
        opt.step()
    assert len(monitor.calls) == 3, "called on skipped steps too"
    stats, params, norms_now = monitor.calls[0]
    assert isinstance(stats, gradstats.GradStats)
    with_grad = [p for p in model.parameters() if p.requires_grad]
    assert len(params) == len(with_grad) and all(a is b for a, b in zip(params, with_grad))
    torch.testing.assert_close(stats.norms, torch.tensor(norms_now), rtol=1e-6, atol=0)
    assert int(monitor.calls[1][0].nan_count) == 1
    assert monitor.skipped == [False, True, False]


def test_grad_monitor_through_the_optimizer_marks_skipped_steps_and_finds_the_nan():
    model = make_model("cpu")
    with gradstats.GradMonitor(model) as monitor:
        opt = gradstats.ClipGradOptimizer(
            OPTIMIZERS["adamw-foreach"](model.parameters()), MAX_NORM, monitor=monitor
        )
        for i, batch in enumerate(make_batches("cpu", steps=6)):
            opt.zero_grad()
            backward(model, batch, math.nan if i == 3 else None)
            opt.step()
        history = monitor.history()
        findings = monitor.diagnose()
    assert history.skipped.tolist() == [0, 0, 0, 1, 0, 0]
    assert int(opt.skipped_steps) == 1
    nonfinite = [f for f in findings if f.cause == "nonfinite_gradients"]
    assert nonfinite and nonfinite[0].step == 3


def test_monitor_sees_the_step_that_raises():
    monitor = RecordingMonitor()
    model = make_model("cpu")
    opt = gradstats.ClipGradOptimizer(
        OPTIMIZERS["adamw-forloop"](model.parameters()),
        MAX_NORM,
        on_nonfinite="error",
        monitor=monitor,
    )
    backward(model, make_batches("cpu")[0], math.nan)
    with pytest.raises(RuntimeError):
        opt.step()
    assert len(monitor.calls) == 1 and int(monitor.calls[0][0].nan_count) == 1


def test_stats_dict():
    model = make_model("cpu")
    opt = gradstats.ClipGradOptimizer(OPTIMIZERS["adamw-fused"](model.named_parameters()), MAX_NORM)
    batches = make_batches("cpu")
    backward(model, batches[0])
    opt.step()
    logged = opt.stats_dict()
    assert logged["total_norm"] > MAX_NORM and logged["clip_coef"] < 1
    assert logged["max_norm"] == MAX_NORM
    assert logged["skipped"] is False and logged["skipped_steps"] == 0
    assert set(logged["norms"]) == {name for name, _ in model.named_parameters()}
    opt.zero_grad()
    backward(model, batches[1], math.nan)
    opt.step()
    logged = opt.stats_dict()
    assert logged["skipped"] is True and logged["skipped_steps"] == 1
    assert logged["nan_count"] == 1 and logged["nonfinite"]["0.weight"] == 1
    assert math.isnan(logged["total_norm"])


# --- state dicts ---------------------------------------------------------------------------------


def roundtrip(state_dict: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("opt_name", ["adamw-fused", "sgd-momentum-foreach"])
def test_state_dict_round_trip_with_adaptive_clip(opt_name):
    half = STEPS // 2
    batches = make_batches("cpu")

    def make():
        model = make_model("cpu")
        clip = gradstats.AdaptiveClip(warmup_steps=4, max_norm=MAX_NORM)
        return model, gradstats.ClipGradOptimizer(OPTIMIZERS[opt_name](model.parameters()), clip)

    def train(model, opt, indices):
        for i in indices:
            opt.zero_grad()
            backward(model, batches[i], math.nan if i == NAN_STEP else None)
            opt.step()

    model, opt = make()
    train(model, opt, range(half))
    saved = roundtrip(opt.state_dict())
    assert set(saved) == {"state", "param_groups", STATE_KEY}
    assert int(saved[STATE_KEY]["skipped_steps"]) == 1
    resumed_model, resumed = make()
    resumed_model.load_state_dict(model.state_dict())
    resumed.load_state_dict(saved)
    assert int(resumed.skipped_steps) == 1
    train(model, opt, range(half, STEPS))
    train(resumed_model, resumed, range(half, STEPS))
    assert_same_training(model, opt, resumed_model, resumed, exact=True)
    for key, value in opt.adaptive.state_dict().items():
        if isinstance(value, torch.Tensor):
            assert_bitwise_equal(value, resumed.adaptive.state_dict()[key], key)


def test_plain_optimizer_loads_the_wrappers_checkpoint_and_back():
    _, opt, _, _ = train_wrapped("cpu", "adamw-forloop", poison_at={NAN_STEP})
    plain = OPTIMIZERS["adamw-forloop"](make_model("cpu").parameters())
    plain.load_state_dict(roundtrip(opt.state_dict()))
    wrapper_sd, plain_sd = opt.state_dict(), plain.state_dict()
    assert plain_sd["param_groups"] == wrapper_sd["param_groups"]
    for key, state in plain_sd["state"].items():
        for name, value in state.items():
            assert_bitwise_equal(value, wrapper_sd["state"][key][name])

    fresh = gradstats.ClipGradOptimizer(
        OPTIMIZERS["adamw-forloop"](make_model("cpu").parameters()), MAX_NORM
    )
    fresh.load_state_dict(roundtrip(plain_sd))
    assert int(fresh.skipped_steps) == 0
    assert fresh.state_dict()["param_groups"] == wrapper_sd["param_groups"]


# Counters a checkpoint must not load: negative, bool (True is no count), text, nothing, beyond
# int64, several values, a float; the first counter is good in the last case, the second not.
BAD_COUNTERS = [
    ("skipped_steps", -1),
    ("skipped_steps", torch.tensor(-3)),
    ("skipped_steps", True),
    ("consecutive_nonfinite", torch.tensor(True)),
    ("skipped_steps", "3"),
    ("skipped_steps", None),
    ("skipped_steps", 2**64),
    ("skipped_steps", [1, 2]),
    ("consecutive_nonfinite", 2.0),
]


def test_bad_wrapper_state_is_rejected_before_anything_changes():
    _, opt, _, _ = train_wrapped("cpu", "adamw-forloop", poison_at={NAN_STEP})
    good = opt.state_dict()
    fresh = gradstats.ClipGradOptimizer(
        OPTIMIZERS["adamw-forloop"](make_model("cpu").parameters()), MAX_NORM
    )
    bad = dict(good, **{STATE_KEY: {"skipped_steps": torch.tensor(1)}})
    with pytest.raises(ValueError, match="lacks 'consecutive_nonfinite'"):
        fresh.load_state_dict(bad)
    assert len(fresh.state) == 0 and int(fresh.skipped_steps) == 0
    bad = dict(good, **{STATE_KEY: {**good[STATE_KEY], "skipped_steps": torch.tensor(1.5)}})
    with pytest.raises(ValueError, match="must be one integer"):
        fresh.load_state_dict(bad)
    assert len(fresh.state) == 0

    for key, value in BAD_COUNTERS:
        bad = dict(good, **{STATE_KEY: {**good[STATE_KEY], key: value}})
        expected = f"state_dict['{STATE_KEY}']['{key}'] must be one integer >= 0 (an int or a"
        with pytest.raises(ValueError, match=re.escape(expected)) as caught:
            fresh.load_state_dict(bad)
        assert f"got {value!r}" in str(caught.value)
        assert len(fresh.state) == 0 and int(fresh.skipped_steps) == 0

    adaptive = gradstats.ClipGradOptimizer(
        OPTIMIZERS["adamw-forloop"](make_model("cpu").parameters()),
        gradstats.AdaptiveClip("percentile", history=8),
    )
    zscore_state = gradstats.AdaptiveClip("zscore").state_dict()
    with pytest.raises(ValueError, match="mode='zscore' state, this AdaptiveClip has mode='perc"):
        adaptive.load_state_dict(
            dict(good, **{STATE_KEY: {**good[STATE_KEY], "adaptive_clip": zscore_state}})
        )
    wrong_history = gradstats.AdaptiveClip("percentile", history=4).state_dict()
    with pytest.raises(ValueError, match=r"shape \(4,\), expected \(8,\)"):
        adaptive.load_state_dict(
            dict(good, **{STATE_KEY: {**good[STATE_KEY], "adaptive_clip": wrong_history}})
        )
    assert len(adaptive.state) == 0


# --- GradScaler ----------------------------------------------------------------------------------

INIT_SCALE = 2.0**12


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "opt_name", ["adamw-fused", "adamw-foreach", "sgd-momentum-fused", "sgd-momentum-forloop"]
)
@pytest.mark.parametrize("unscale_first", [False, True], ids=["scaler.step", "unscale_+step"])
def test_grad_scaler_clips_the_unscaled_gradients(device, opt_name, unscale_first):
    overflow_step = NAN_STEP
    batches = make_batches(device)

    def run(wrapped: bool):
        model = make_model(device)
        opt = OPTIMIZERS[opt_name](model.parameters())
        if wrapped:
            opt = gradstats.ClipGradOptimizer(opt, MAX_NORM)
        scaler = torch.amp.GradScaler(device, init_scale=INIT_SCALE)
        scales = []
        for i, (x, y) in enumerate(batches):
            opt.zero_grad()
            scaler.scale(nn.functional.mse_loss(model(x), y)).backward()
            if i == overflow_step:
                with torch.no_grad():
                    model[0].weight.grad[0, 0] = math.inf
            if not wrapped or unscale_first:
                scaler.unscale_(opt)
            if not wrapped:
                gradstats.clip_grad_norm_(model.parameters(), MAX_NORM)
            scaler.step(opt)
            scaler.update()
            scales.append(scaler.get_scale())
        return model, opt, scales

    ref_model, ref_opt, ref_scales = run(wrapped=False)
    model, opt, scales = run(wrapped=True)
    assert scales == ref_scales and scales[overflow_step] < scales[overflow_step - 1]
    assert int(opt.skipped_steps) == 1
    assert_same_training(model, opt, ref_model, ref_opt, exact=False)


# --- adaptive clipping ---------------------------------------------------------------------------

WARMUP = 8
STEADY = [1.0 + 0.05 * math.sin(i) for i in range(40)]
SPIKE = 50.0


def drive(clip: gradstats.AdaptiveClip, norms: list[float], device: str = "cpu"):
    """Steps a one-parameter SGD(lr=0) whose gradient has the given norms; returns, per step, the
    threshold used and the norm of the gradient the optimizer was handed (after clipping)."""
    p = nn.Parameter(torch.zeros(4, device=device))
    opt = gradstats.ClipGradOptimizer(torch.optim.SGD([p], lr=0.0), clip)
    direction = torch.tensor([0.5, -0.5, 0.5, 0.5], device=device)
    thresholds, applied = [], []
    for norm in norms:
        p.grad = direction * norm
        opt.step()
        thresholds.append(float(opt.last_threshold))
        applied.append(float(p.grad.norm()))
    return opt, thresholds, applied


def zscore_oracle(norms, z, decay, warmup):
    mean = var = 0.0
    count = 0
    out = []
    for x in norms:
        threshold = mean + z * math.sqrt(var) if count >= warmup else math.inf
        out.append(threshold)
        if not math.isfinite(x):
            continue
        clipped = min(x, threshold)
        count += 1
        w = max(1.0 / count, 1.0 - decay)
        delta = clipped - mean
        mean += w * delta
        var = (1 - w) * (var + w * delta * delta)
    return out


@pytest.mark.parametrize("device", DEVICES)
def test_zscore_clips_a_spike_and_leaves_steady_training_alone(device):
    norms = [*STEADY[:20], SPIKE, math.nan, *STEADY[20:]]
    clip = gradstats.AdaptiveClip("zscore", warmup_steps=WARMUP)
    opt, thresholds, applied = drive(clip, norms, device)
    expected = zscore_oracle(norms, clip.z_threshold, clip.ema_decay, WARMUP)
    for i, (got, want) in enumerate(zip(thresholds, expected)):
        assert got == want if math.isinf(want) else math.isclose(got, want, rel_tol=1e-5), i
    spike = norms.index(SPIKE)
    assert applied[spike] == pytest.approx(thresholds[spike], rel=1e-5)
    assert thresholds[spike] < 2 * max(STEADY), "the spike was clipped to the steady range"
    steady = [i for i, x in enumerate(norms) if x in STEADY]
    assert all(applied[i] == pytest.approx(norms[i], rel=1e-6) for i in steady), "steady: no clip"
    assert thresholds[spike + 2] == pytest.approx(thresholds[spike], rel=0.05), "spike not absorbed"
    assert int(opt.skipped_steps) == 1
    assert int(clip.steps_seen) == len(norms) - 1


@pytest.mark.parametrize("device", DEVICES)
def test_percentile_clips_to_the_quantile_of_recent_norms(device):
    history = 16
    norms = [*STEADY[:20], SPIKE, math.nan, *STEADY[20:30]]
    clip = gradstats.AdaptiveClip(
        "percentile", percentile=90.0, history=history, warmup_steps=WARMUP
    )
    _, thresholds, applied = drive(clip, norms, device)
    seen: list[float] = []
    for i, x in enumerate(norms):
        if len(seen) < WARMUP:
            assert math.isinf(thresholds[i])
        else:
            window = torch.tensor(seen[-history:], dtype=torch.float32)
            assert thresholds[i] == pytest.approx(float(torch.quantile(window, 0.9)), rel=1e-6)
        if math.isfinite(x):
            clipped = x > thresholds[i]
            assert applied[i] == pytest.approx(thresholds[i] if clipped else x, rel=1e-5), i
            seen.append(x)
    spike = norms.index(SPIKE)
    assert applied[spike] < 2 * max(STEADY)


def test_nonfinite_steps_do_not_touch_the_adaptive_state():
    clip = gradstats.AdaptiveClip("zscore", warmup_steps=2)
    opt, _, _ = drive(clip, STEADY[:5])
    before = clip.state_dict()
    p = opt.param_groups[0]["params"][0]
    for bad in (math.nan, math.inf):
        p.grad = torch.full_like(p, bad)
        opt.step()
    after = clip.state_dict()
    for key in ("count", "mean", "var"):
        assert_bitwise_equal(before[key], after[key], key)


def test_adaptive_clip_in_training_clips_a_loss_spike():
    model = make_model("cpu")
    clip = gradstats.AdaptiveClip(warmup_steps=WARMUP)
    opt = gradstats.ClipGradOptimizer(OPTIMIZERS["adamw-fused"](model.parameters()), clip)
    spike_step, spike_factor = STEPS - 2, 1e3
    for i, (x, y) in enumerate(make_batches("cpu")):
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        (loss * (spike_factor if i == spike_step else 1.0)).backward()
        opt.step()
        if i < WARMUP:
            assert float(opt.last_stats.clip_coef) == 1.0, "no clipping during warm-up"
        if i == spike_step:
            assert float(opt.last_stats.clip_coef) < 1.0 / spike_factor * 10
    assert int(clip.steps_seen) == STEPS


# --- torch.compile -------------------------------------------------------------------------------


@pytest.mark.parametrize("opt_name", ["adamw-fused", "adamw-foreach"])
def test_compiled_train_step(opt_name):
    torch._dynamo.reset()
    steps = 8

    def make():
        model = make_model("cpu")
        return model, gradstats.ClipGradOptimizer(
            OPTIMIZERS[opt_name](model.parameters()), MAX_NORM
        )

    def train_step(model, opt, x, y, poison):
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        with torch.no_grad():
            model[0].weight.grad[0, 0] += poison
        opt.step()
        return loss

    compiled = torch.compile(train_step, backend="aot_eager")
    eager_model, eager_opt = make()
    model, opt = make()
    for i, (x, y) in enumerate(make_batches("cpu", steps)):
        poison = torch.tensor(math.nan if i == 3 else 0.0)
        train_step(eager_model, eager_opt, x, y, poison)
        compiled(model, opt, x, y, poison)
    assert int(opt.skipped_steps) == int(eager_opt.skipped_steps) == 1
    assert_same_training(model, opt, eager_model, eager_opt, exact=False)


# --- host reads: which paths synchronise ----------------------------------------------------------


@pytest.fixture
def count_host_reads():
    """Counts every tensor-to-Python read (the calls that synchronise on a GPU), by anyone."""
    with counting_host_reads() as counts:
        yield counts


# Inner optimizers that read nothing back themselves on the CPU (torch's foreach Adam reads its
# step counters), so that every read counted below is the wrapper's: one fused and one not.
READ_FREE = ("adamw-fused", "sgd-momentum-fused", "sgd-momentum-foreach", "sgd-momentum-forloop")


def test_the_read_free_inner_optimizers_read_nothing(count_host_reads):
    for name in READ_FREE:
        model = make_model("cpu")
        inner = OPTIMIZERS[name](model.parameters())
        for batch in make_batches("cpu", steps=2):
            inner.zero_grad()
            backward(model, batch)
            count_host_reads.clear()
            inner.step()
            assert count_host_reads.total() == 0, name


def test_the_read_counter_can_fail(count_host_reads):
    """The counter sees a read made anywhere (here by torch's foreach Adam)."""
    model = make_model("cpu")
    inner = OPTIMIZERS["adamw-foreach"](model.parameters())
    backward(model, make_batches("cpu", steps=1)[0])
    inner.step()
    assert count_host_reads.total() > 0


@pytest.mark.parametrize(
    ("opt_name", "policy", "reads_first", "reads_later"),
    [
        ("adamw-fused", "skip", 1, 0),
        ("sgd-momentum-fused", "skip", 1, 0),
        ("adamw-fused", "zero", 0, 0),
        ("adamw-fused", "propagate", 0, 0),
        ("sgd-momentum-foreach", "skip", 1, 1),
        ("sgd-momentum-forloop", "skip", 1, 1),
        ("sgd-momentum-foreach", "zero", 0, 0),
        ("sgd-momentum-foreach", "propagate", 0, 0),
        ("adamw-fused", "error", 1, 1),
    ],
)
def test_host_reads_per_path(count_host_reads, opt_name, policy, reads_first, reads_later):
    assert opt_name in READ_FREE
    model = make_model("cpu")
    opt = gradstats.ClipGradOptimizer(
        OPTIMIZERS[opt_name](model.parameters()), MAX_NORM, on_nonfinite=policy
    )
    poison = math.nan if policy != "error" else None
    reads = []
    for i, batch in enumerate(make_batches("cpu", steps=CLIP_EVERY * 2)):
        opt.zero_grad()
        backward(model, batch, poison if i == CLIP_EVERY else None)
        count_host_reads.clear()
        opt.step()
        reads.append(count_host_reads.total())
    assert reads == [reads_first] + [reads_later] * (len(reads) - 1)


# --- bad input -----------------------------------------------------------------------------------


def test_bad_arguments():
    params = list(make_model("cpu").parameters())
    inner = torch.optim.SGD(params, lr=0.1)
    with pytest.raises(TypeError, match=r"wraps a torch\.optim\.Optimizer; got list"):
        gradstats.ClipGradOptimizer(params, MAX_NORM)
    with pytest.raises(TypeError, match="already a ClipGradOptimizer"):
        gradstats.ClipGradOptimizer(gradstats.ClipGradOptimizer(inner, MAX_NORM), MAX_NORM)
    with pytest.raises(ValueError, match="on_nonfinite must be one of"):
        gradstats.ClipGradOptimizer(inner, MAX_NORM, on_nonfinite="ignore")
    with pytest.raises(ValueError, match="max_norm must be a non-negative number"):
        gradstats.ClipGradOptimizer(inner, -1.0)
    with pytest.raises(ValueError, match="norm_type must be a number"):
        gradstats.ClipGradOptimizer(inner, MAX_NORM, norm_type=math.nan)
    with pytest.raises(
        ValueError, match="max_consecutive_nonfinite must be None or an integer >= 1"
    ):
        gradstats.ClipGradOptimizer(inner, MAX_NORM, max_consecutive_nonfinite=0)
    with pytest.raises(TypeError, match="monitor must have a step"):
        gradstats.ClipGradOptimizer(inner, MAX_NORM, monitor=object())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"mode": "median"}, "mode must be one of"),
        ({"z_threshold": 0.0}, "z_threshold must be > 0"),
        ({"ema_decay": 1.0}, r"ema_decay must be in \[0, 1\)"),
        ({"percentile": 101.0}, r"percentile must be in \[0, 100\]"),
        ({"history": 0}, "history must be an integer >= 1"),
        ({"warmup_steps": 0}, "warmup_steps must be an integer >= 1"),
        ({"max_norm": math.nan}, "max_norm must be a non-negative number"),
    ],
)
def test_adaptive_clip_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        gradstats.AdaptiveClip(**kwargs)


# --- GPU only: the fused path does not synchronise -----------------------------------------------


@pytest.mark.parametrize("device", [d for d in DEVICES if d != "cpu"])
@pytest.mark.parametrize("clip", ["fixed", "zscore", "percentile"])
def test_fused_path_has_no_host_sync(device, clip):
    model = make_model(device)
    max_norm = MAX_NORM if clip == "fixed" else gradstats.AdaptiveClip(clip, warmup_steps=2)
    opt = gradstats.ClipGradOptimizer(OPTIMIZERS["adamw-fused"](model.parameters()), max_norm)
    batches = make_batches(device)
    backward(model, batches[0])
    opt.step()  # the first step syncs once, by design
    for i, batch in enumerate(batches[1:], start=1):
        opt.zero_grad()
        backward(model, batch, math.nan if i == NAN_STEP else None)
        torch.cuda.set_sync_debug_mode("error")
        try:
            opt.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert int(opt.skipped_steps) == 1
