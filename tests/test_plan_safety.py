"""A plan never reads or writes memory that is not the gradient's, whatever torch lets a user do
to a gradient between two planned calls (issue 21): each planned call is bitwise the functional
call on twins of the same gradients, and the gradients themselves are the ones clipped. New
gradient tensors with the same layouts keep the plan; any change of layout re-plans."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import twin
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import gradstats

MAX_NORM = 0.5  # below every norm here: each call clips


def params_with_grads(shapes, seed=0, scale=3.0):
    gen = torch.Generator().manual_seed(seed)
    params = [nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen) * scale
    return params


def assert_planned_is_functional(plan, params, **kwargs):
    """The planned clip and the functional clip of twins: bitwise the same norm and gradients."""
    functional = twin(params)
    got = plan.clip_grad_norm_(MAX_NORM, **kwargs)
    want = gradstats.clip_grad_norm_(functional, MAX_NORM, **kwargs)
    torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)
    for p, q in zip(params, functional):
        assert (p.grad is None) == (q.grad is None)
        if p.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0, equal_nan=True)


# ------------------------------------------------------------------- storage changed in place


def test_storage_reallocated_in_place_is_read_where_it_is_now():
    """FSDP-style: the gradient's storage freed (resize_ to 0) and re-allocated (same StorageImpl,
    new memory); the plan must read and clip the new memory, not the freed one."""
    params = params_with_grads([(300,), (40, 5)])
    plan = gradstats.GradPlan(params)
    plan.grad_stats()
    storage = params[0].grad.untyped_storage()
    nbytes = storage.nbytes()
    storage.resize_(0)
    storage.resize_(nbytes)
    params[0].grad.copy_(torch.randn(300) * 4)
    assert_planned_is_functional(plan, params)
    assert plan.builds == 1  # the same layout: kept


def test_views_of_a_flat_buffer_follow_its_reallocation():
    """Gradients that are views of one flat buffer, which is then resized (re-allocated)."""
    flat = torch.randn(500) * 3
    params = [nn.Parameter(torch.zeros(200)), nn.Parameter(torch.zeros(10, 30))]
    params[0].grad = flat[:200]
    params[1].grad = flat[200:500].view(10, 30)
    plan = gradstats.GradPlan(params)
    plan.grad_stats()
    flat.resize_(100_000)  # a new allocation: the views' data pointers move with it
    flat[:500].copy_(torch.randn(500) * 5)
    assert_planned_is_functional(plan, params)


def test_a_storage_freed_and_not_reallocated_is_refused_clearly():
    params = params_with_grads([(300,)])
    plan = gradstats.GradPlan(params)
    plan.grad_stats()
    params[0].grad.untyped_storage().resize_(0)
    with pytest.raises(RuntimeError, match="reaches past the end of its storage"):
        plan.clip_grad_norm_(MAX_NORM)
    with pytest.raises(RuntimeError, match="reaches past the end of its storage"):
        gradstats.clip_grad_norm_(params, MAX_NORM)


# --------------------------------------------------------------- same numel, another layout


@pytest.mark.parametrize("change", ["as_strided_", "set_", "resize_"])
def test_same_numel_new_layout_re_plans(change):
    base = torch.randn(64) * 3
    params = [nn.Parameter(torch.zeros(8, 4)), nn.Parameter(torch.zeros(20))]
    params[0].grad = base[::2].view(8, 4)  # every other element of base
    params[1].grad = torch.randn(20) * 3
    plan = gradstats.GradPlan(params)
    plan.grad_stats()
    g = params[0].grad
    if change == "as_strided_":
        g.as_strided_((8, 4), (1, 8))  # the first 32 elements of base, transposed walk
    elif change == "set_":
        g.set_(g.untyped_storage(), g.storage_offset(), (4, 8), (16, 2))
    else:
        assert not g.is_contiguous()
        g.resize_(4, 8)  # the same numel and memory, contiguous strides from its offset now
    params[0].data = torch.zeros(params[0].grad.shape)  # the shape twin() assigns against
    assert_planned_is_functional(plan, params)
    assert plan.builds == 2


# ---------------------------------------------------------------------------- swap_tensors


def test_swap_tensors_is_followed():
    """torch.utils.swap_tensors exchanges the tensors behind two Python objects (Module._apply
    and load_state_dict(assign=True) can do it): the parameter's gradient now is the other's."""
    params = params_with_grads([(50,), (60,)])
    other = nn.Parameter(torch.randn(50))
    other.grad = torch.randn(50) * 7
    plan = gradstats.GradPlan(params)
    plan.grad_stats()
    torch.utils.swap_tensors(params[0], other)
    assert_planned_is_functional(plan, params)
    del other  # the tensor the plan saw first is gone: nothing may point at it
    assert_planned_is_functional(plan, params)


def test_data_assignment_is_followed():
    params = params_with_grads([(50,), (60,)])
    plan = gradstats.GradPlan(params)
    plan.grad_stats()
    params[1].grad.data = torch.randn(60) * 9  # the same tensor object, new memory
    assert_planned_is_functional(plan, params)
    params[1].grad.data = torch.randn(61)  # and a new shape
    params[1].data = torch.randn(61)
    assert_planned_is_functional(plan, params)


# ----------------------------------------------------------------- kept across set_to_none


def test_new_gradient_tensors_with_the_same_layouts_keep_the_plan():
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
    plan = gradstats.GradPlan(model.parameters())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(4):
        opt.zero_grad(set_to_none=True)  # torch's default: new gradient tensors each step
        model(torch.randn(4, 8)).sum().backward()
        assert_planned_is_functional(plan, list(model.parameters()))
        opt.step()
    assert plan.builds == 1


@pytest.mark.parametrize("change", ["dtype", "shape", "strides", "none", "conj"])
def test_a_real_layout_change_re_plans(change):
    params = params_with_grads([(6, 5), (7,)])
    plan = gradstats.GradPlan(params)
    plan.grad_stats()
    if change == "dtype":
        params[0].data = params[0].data.double()
        params[0].grad = torch.randn(6, 5, dtype=torch.float64)
    elif change == "shape":
        params[0].data = torch.randn(5, 6)
        params[0].grad = torch.randn(5, 6)
    elif change == "strides":
        params[0].grad = torch.randn(5, 6).t()
    elif change == "none":
        params[1].grad = None
    else:
        params.append(nn.Parameter(torch.randn(3, dtype=torch.complex64)))
        params[-1].grad = torch.randn(3, dtype=torch.complex64)
        plan = gradstats.GradPlan(params)
        plan.grad_stats()
        params[-1].grad = torch.randn(3, dtype=torch.complex64).conj()  # the conjugate bit
    assert_planned_is_functional(plan, params)
    assert plan.builds == 2


# ----------------------------------------------------------------------- ClipGradOptimizer


@pytest.mark.parametrize("edit", ["replace_in_list", "new_list"])
def test_clip_optimizer_follows_its_param_groups(edit):
    """A parameter replaced in a group (same list, same length) or a new list of the same length:
    the new parameter is clipped and checked; its NaN gradient skips the step."""
    old = [nn.Parameter(torch.randn(5)), nn.Parameter(torch.randn(5))]
    opt = gradstats.ClipGradOptimizer(torch.optim.SGD(old, lr=0.1), MAX_NORM, on_nonfinite="skip")
    for p in old:
        p.grad = torch.randn(5)
    opt.step()
    new = nn.Parameter(torch.randn(5))
    if edit == "replace_in_list":
        opt.param_groups[0]["params"][1] = new
    else:
        opt.param_groups[0]["params"] = [old[0], new]
    for p in (old[0], new):
        p.grad = torch.randn(5)
    new.grad[2] = math.nan
    before = [old[0].detach().clone(), new.detach().clone()]
    opt.step()
    assert int(opt.skipped_steps) == 1, "the NaN in the new parameter must skip the step"
    assert torch.equal(old[0], before[0]) and torch.equal(new, before[1])
    assert opt.last_stats.counts[0, 1] == 1  # the new parameter's NaN, counted


def test_a_sparse_gradient_gets_the_functional_message():
    emb = nn.Embedding(10, 3, sparse=True)
    emb(torch.tensor([1, 2])).sum().backward()
    plan = gradstats.GradPlan(emb.parameters())
    with pytest.raises(RuntimeError, match="Sparse gradients are not supported"):
        plan.clip_grad_norm_(1.0)
    opt = gradstats.ClipGradOptimizer(torch.optim.SGD(emb.parameters(), lr=0.1), 1.0)
    with pytest.raises(RuntimeError, match="Sparse gradients are not supported"):
        opt.step()


# ----------------------------------------------------------------------- property: any mix

SHAPES = [(6, 5), (7,), (3, 4, 2)]
POLICIES = ["propagate", "zero"]


def mutate(params, what, value, others):
    """One change torch allows between two steps, to the gradient of params[what % n]."""
    p = params[what % len(params)]
    g = p.grad
    kind = value % 11
    if g is None or kind == 0:
        p.grad = torch.randn(p.shape, dtype=p.dtype) * 3  # a new tensor (set_to_none + backward)
    elif kind == 1:
        p.grad = None
    elif kind == 2:
        storage = g.untyped_storage()
        nbytes = storage.nbytes()
        storage.resize_(0)
        storage.resize_(nbytes)
        g.copy_(torch.randn(g.shape, dtype=g.dtype))
    elif kind == 3:
        g.mul_(value)  # new values, same memory
    elif kind == 4 and g.is_contiguous() and g.dim() == 2:
        g.as_strided_(g.shape[::-1], (1, g.shape[1]))
        p.data = p.data.t()
    elif kind == 5:
        g.data = torch.randn(g.shape, dtype=g.dtype)
    elif kind == 6:
        p.data = p.data.double()
        p.grad = torch.randn(p.shape, dtype=torch.float64)
    elif kind == 7:
        where = torch.unravel_index(torch.tensor(value % g.numel()), g.shape)
        g[tuple(int(i) for i in where)] = math.nan if value % 2 else math.inf
    elif kind == 8:
        torch.utils.swap_tensors(p, others[what % len(others)])
    elif kind == 9:
        g.set_(torch.randn(g.numel() + 5, dtype=g.dtype).untyped_storage(), 5, g.shape, g.stride())
    else:
        p.grad = torch.randn(p.shape, dtype=p.dtype).t().contiguous().t() if g.dim() == 2 else g


@settings(
    max_examples=60,
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(
    st.lists(
        st.tuples(st.integers(0, 100), st.integers(0, 1000), st.sampled_from(POLICIES)),
        min_size=1,
        max_size=8,
    )
)
def test_any_mutations_between_planned_calls_stay_bitwise_the_functional_call(steps):
    params = params_with_grads(SHAPES)
    others = params_with_grads(SHAPES, seed=1)
    plan = gradstats.GradPlan(params)
    assert_planned_is_functional(plan, params)
    for what, value, policy in steps:
        mutate(params, what, value, others)
        assert_planned_is_functional(plan, params, on_nonfinite=policy)
