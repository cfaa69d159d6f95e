"""GradPlan: bitwise the functional API's results, planned once and re-planned on every change."""

from __future__ import annotations

import gc
import math
import weakref

import pytest
import torch
from helpers import DEVICES, twin
from torch import nn

import gradstats


def make_params(device: str, seed: int = 0) -> list[nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    shapes = [(40, 30), (30,), (0,), (7, 3, 2), (70000,)]
    params = [nn.Parameter(torch.randn(s, generator=gen).to(device)) for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen).to(device) * 3
    return params


def same(x: torch.Tensor, y: torch.Tensor) -> None:
    """Bitwise equal values, NaN where NaN."""
    torch.testing.assert_close(x, y, rtol=0, atol=0, equal_nan=True)


def assert_same_grads(a: list[nn.Parameter], b: list[nn.Parameter]) -> None:
    for x, y in zip(a, b):
        assert (x.grad is None) == (y.grad is None)
        if x.grad is not None:
            same(x.grad, y.grad)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("policy", ["propagate", "skip", "zero", "error"])
@pytest.mark.parametrize("max_norm", [0.5, 1e9])
@pytest.mark.parametrize("norm_type", [2.0, math.inf, 3.0])
def test_bitwise_the_functional_results(device, policy, max_norm, norm_type):
    planned = make_params(device)
    if policy != "error":
        planned[0].grad[1, 2] = math.nan
    functional = twin(planned)
    plan = gradstats.GradPlan(planned)
    kwargs = {"norm_type": norm_type, "on_nonfinite": policy}
    got = plan.clip_grad_norm_(max_norm, **kwargs)
    want = gradstats.clip_grad_norm_(functional, max_norm, **kwargs)
    same(got, want)
    assert_same_grads(planned, functional)
    st = plan.grad_stats(norm_type, max_norm=max_norm)
    ref = gradstats.grad_stats(functional, norm_type, max_norm=max_norm)
    for a, b in [(st.total_norm, ref.total_norm), (st.norms, ref.norms), (st.counts, ref.counts)]:
        same(a, b)
    assert plan.builds == 1


@pytest.mark.parametrize("policy", ["propagate", "zero", "error"])
def test_return_stats_as_the_functional_call(policy):
    planned = make_params("cpu")
    functional = twin(planned)
    got = gradstats.GradPlan(planned).clip_grad_norm_(0.5, on_nonfinite=policy, return_stats=True)
    want = gradstats.clip_grad_norm_(functional, 0.5, on_nonfinite=policy, return_stats=True)
    for a, b in [(got.total_norm, want.total_norm), (got.clip_coef, want.clip_coef)]:
        same(a, b)
    same(got.norms, want.norms)
    same(got.counts, want.counts)
    assert_same_grads(planned, functional)


def test_the_comparison_can_fail():
    planned = make_params("cpu")
    functional = twin(planned)
    gradstats.GradPlan(planned).clip_grad_norm_(0.5)
    gradstats.clip_grad_norm_(functional, 0.6)
    with pytest.raises(AssertionError, match="not equal"):
        assert_same_grads(planned, functional)


def test_error_policy_raises_before_any_change():
    params = make_params("cpu")
    params[3].grad[0, 0, 0] = math.inf
    before = [p.grad.clone() for p in params]
    with pytest.raises(RuntimeError, match=r"(?s)non-finite.*tensor 3"):
        gradstats.GradPlan(params).clip_grad_norm_(0.5, error_if_nonfinite=True)
    assert all(torch.equal(p.grad, b) for p, b in zip(params, before))


def test_a_steady_training_loop_plans_once():
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
    plan = gradstats.GradPlan(model.parameters())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(5):
        opt.zero_grad(set_to_none=False)  # gradients kept and zeroed in place: the same tensors
        model(torch.randn(4, 8)).sum().backward()
        plan.clip_grad_norm_(1.0)
        opt.step()
    assert plan.builds == 1


@pytest.mark.parametrize("device", DEVICES)
def test_no_plan_keeps_a_step_s_gradients_alive(device):
    """zero_grad(set_to_none=True) frees the gradients, with a GradPlan and a ClipGradOptimizer
    (which plans its parameters) as without; a reference held elsewhere keeps them, the control."""
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 2)).to(device)
    opt = gradstats.ClipGradOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), 1.0)
    plan = gradstats.GradPlan(model.parameters())
    for step in range(3):
        model(torch.randn(4, 64, device=device)).sum().backward()
        plan.clip_grad_norm_(1.0)
        opt.step()
        grads = [weakref.ref(p.grad) for p in model.parameters()]
        held = model[0].weight.grad if step == 2 else None
        opt.zero_grad()
        gc.collect()
        alive = [r() is not None for r in grads]
        assert alive == [held is not None] + [False] * (len(grads) - 1), step
    assert plan.builds == 1  # the new gradients of each step have the same layouts


@pytest.mark.parametrize(
    "change",
    [
        "set_to_none",
        "grad_none",
        "new_grad",
        "grad_data",
        "resized",
        "dtype",
        "transposed",
    ],
)
def test_every_change_re_plans_and_stays_bitwise(change):
    planned = make_params("cpu")
    planned[2].grad = None
    plan = gradstats.GradPlan(planned)
    plan.grad_stats()
    assert plan.builds == 1
    if change == "set_to_none":
        for p in planned:  # zero_grad(set_to_none=True), then a backward: new tensors
            p.grad = None if p.grad is None else torch.randn_like(p)
    elif change == "grad_none":
        planned[0].grad = None
    elif change == "new_grad":
        planned[2].grad = torch.zeros_like(planned[2])
    elif change == "grad_data":
        planned[1].grad.data = torch.randn(30)  # the same tensor object, new memory
    elif change == "resized":
        planned[1].data = torch.randn(31)
        planned[1].grad = torch.randn(31)
    elif change == "dtype":
        planned[3].data = planned[3].data.double()
        planned[3].grad = torch.randn(7, 3, 2, dtype=torch.float64)
    elif change == "transposed":
        planned[0].grad.t_()  # the same tensor and memory, another layout: walked anew
        planned[0].data = planned[0].data.t()
    functional = twin(planned)
    got = plan.clip_grad_norm_(0.5)
    want = gradstats.clip_grad_norm_(functional, 0.5)
    # New tensors or new memory with the same layouts keep the plan; a new layout re-plans.
    assert plan.builds == (1 if change in ("set_to_none", "grad_data") else 2)
    assert torch.equal(got, want)
    assert_same_grads(planned, functional)
    want_with = [p for p in planned if p.grad is not None]
    assert len(plan.params_with_grads) == len(want_with)
    assert all(a is b for a, b in zip(plan.params_with_grads, want_with))


def test_values_are_read_at_every_call():
    """The plan caches where the gradients are, never their values."""
    params = make_params("cpu")
    plan = gradstats.GradPlan(params)
    first = plan.grad_stats().total_norm.clone()
    for p in params:
        p.grad.mul_(2)
    assert torch.allclose(plan.grad_stats().total_norm, first * 2, rtol=1e-6)
    assert plan.builds == 1


@pytest.mark.parametrize("kind", ["complex", "expanded", "seventeen_dims", "none"])
def test_what_the_plan_does_not_keep_takes_the_functional_path(kind):
    params = make_params("cpu")
    if kind == "complex":
        params.append(nn.Parameter(torch.randn(5, dtype=torch.complex64)))
        params[-1].grad = torch.randn(5, dtype=torch.complex64)
    elif kind == "expanded":
        params.append(nn.Parameter(torch.randn(4, 3)))
        params[-1].grad = torch.randn(1, 3).expand(4, 3)
    elif kind == "seventeen_dims":
        base = torch.randn([3] * 17, dtype=torch.float64)
        params.append(nn.Parameter(torch.zeros([2] * 17, dtype=torch.float64)))
        params[-1].grad = base[(slice(None, None, 2),) * 17]
    else:
        for p in params:
            p.grad = None
    functional = twin(params)
    plan = gradstats.GradPlan(params)
    st = plan.grad_stats()
    ref = gradstats.grad_stats(functional)
    assert torch.equal(st.total_norm, ref.total_norm)
    assert torch.equal(st.counts, ref.counts)
    if kind == "complex":  # complex gradients: read as their moduli, scaled through the real view
        got = plan.clip_grad_norm_(0.5)
        assert torch.equal(got, gradstats.clip_grad_norm_(functional, 0.5))
        assert_same_grads(params, functional)


def test_clip_optimizer_plans_its_param_groups_once_and_again_after_add_param_group():
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
    opt = gradstats.ClipGradOptimizer(torch.optim.SGD(model[0].parameters(), lr=0.1), 0.5)
    reference = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
    reference.load_state_dict(model.state_dict())
    ref_opt = torch.optim.SGD(reference[0].parameters(), lr=0.1)
    for step in range(4):
        if step == 2:
            opt.add_param_group({"params": model[2].parameters()})
            ref_opt.add_param_group({"params": reference[2].parameters()})
        x = torch.randn(4, 8)
        for m, o in ((model, opt), (reference, ref_opt)):
            o.zero_grad()
            m(x).sum().backward()
        opt.step()
        params = [p for g in ref_opt.param_groups for p in g["params"]]
        gradstats.clip_grad_norm_(params, 0.5)
        ref_opt.step()
    for a, b in zip(model.parameters(), reference.parameters()):
        assert torch.equal(a, b)
    assert len(opt.last_stats.norms) == 4  # both groups' parameters after add_param_group


def test_bad_parameters():
    with pytest.raises(TypeError, match="GradPlan: item 1 is a str"):
        gradstats.GradPlan([torch.zeros(1), "weight"])
