"""The defects an adversarial review found in the drop-ins (issue 12), one test each, and every
norm_type torch accepts against torch itself."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from helpers import DEVICES, NORM_RTOL, assert_close_rel
from reference import reference_stats
from torch import nn

import gradstats

FLOAT32_MAX = torch.finfo(torch.float32).max
# 1000 gradients of 3e38: every element finite, their L2 norm 9.5e39 beyond float32.
HUGE, COUNT = 3e38, 1000


def params_with_grads(grads: list[torch.Tensor]) -> list[nn.Parameter]:
    params = [nn.Parameter(torch.zeros_like(g)) for g in grads]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    return params


def huge_params(device: str) -> list[nn.Parameter]:
    return params_with_grads([torch.full((COUNT,), HUGE, device=device)])


# --- 1. a float32 norm that overflows from finite values ---------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_an_overflowing_float32_norm_clips_and_never_zeroes(device):
    params = huge_params(device)
    norm = gradstats.clip_grad_norm_(params, 1.0)
    assert norm.dtype == torch.float32 and norm.item() == math.inf  # as torch reports it
    exact = HUGE * math.sqrt(COUNT)
    got = params[0].grad.double()
    assert (got > 0).all(), "finite gradients were zeroed"
    want = HUGE / exact  # every element scaled by max_norm / exact norm
    assert_close_rel(got[0].item(), want, 1e-5, "clipped element")  # a float32 subnormal factor
    assert_close_rel(torch.linalg.vector_norm(got).item(), 1.0, 1e-5, "clipped norm")


@pytest.mark.parametrize("device", DEVICES)
def test_torch_zeroes_what_gradstats_clips(device):
    """The negative control of the test above: torch's own clip zeroes these gradients."""
    params = huge_params(device)
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    assert (params[0].grad == 0).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("how", ["error", "error_if_nonfinite", "skip"])
def test_an_overflowing_norm_is_non_finite_for_error_and_skip(device, how):
    params = huge_params(device)
    before = params[0].grad.clone()
    if how == "skip":
        gradstats.clip_grad_norm_(params, 1.0, on_nonfinite="skip")
    else:
        kwargs = {"error_if_nonfinite": True} if how == "error_if_nonfinite" else {}
        policy = {"on_nonfinite": "error"} if how == "error" else {}
        with pytest.raises(RuntimeError, match=r"(?s)non-finite.*every element is finite"):
            gradstats.clip_grad_norm_(params, 1.0, **kwargs, **policy)
    assert torch.equal(params[0].grad, before)


@pytest.mark.parametrize("on_nonfinite", ["skip", "propagate"])
def test_clip_optimizer_over_fused_adamw_with_an_overflowing_norm(on_nonfinite):
    params = huge_params("cpu")
    grad = params[0].grad.clone()
    inner = torch.optim.AdamW(params, lr=0.1, fused=True)
    opt = gradstats.ClipGradOptimizer(inner, 1.0, on_nonfinite=on_nonfinite)
    opt.step()
    if on_nonfinite == "skip":
        assert int(opt.skipped_steps) == 1
        assert torch.equal(params[0].detach(), torch.zeros(COUNT))
        assert not inner.state, "a skipped step created optimizer state"
        return
    assert int(opt.skipped_steps) == 0
    exp_avg = inner.state[params[0]]["exp_avg"]
    # Adam's first moment is (1 - beta1) x the clipped gradient: nonzero, in the right ratio.
    clipped = grad.double() / (HUGE * math.sqrt(COUNT))
    torch.testing.assert_close(exp_avg.double(), 0.1 * clipped, rtol=1e-4, atol=0)


# --- 2. p-norms of large p -----------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("p", [1100.0, 5000.0, 1e6])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_large_p_norms_match_the_oracle(device, p, dtype):
    small = torch.tensor([3.0, -4.0, 0.0, 1.5], device=device, dtype=dtype)
    assert_close_rel(gradstats.get_total_norm([small], p).item(), 4.0, 1e-6, f"p={p}")
    tensors = [
        torch.randn(5000, device=device).to(dtype) * 1e-3,
        torch.rand(300, device=device).to(dtype),
    ]
    ref = reference_stats([t.cpu() for t in tensors], p)
    st = gradstats.grad_stats(tensors, norm_type=p)
    assert_close_rel(st.total_norm.item(), ref.total_norm, 1e-6, "total")
    for got, want in zip(st.norms.tolist(), ref.norms):
        assert_close_rel(got, want, 1e-6, "per-tensor")


# --- 3. closures, LBFGS included -------------------------------------------------------------


def lbfgs_problem():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 1))
    x, y = torch.randn(64, 6), torch.randn(64, 1) * 5
    return model, x, y


def lbfgs_run(max_norm: float, clip_in_closure) -> tuple[list[float], list[torch.Tensor]]:
    """Three LBFGS steps (strong Wolfe line search: several evaluations per step). clip_in_closure
    None: ClipGradOptimizer does the clipping; else that function clips inside the closure."""
    model, x, y = lbfgs_problem()
    evaluations = []
    inner = torch.optim.LBFGS(model.parameters(), max_iter=5, line_search_fn="strong_wolfe")
    opt = gradstats.ClipGradOptimizer(inner, max_norm) if clip_in_closure is None else inner

    def closure():
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        if clip_in_closure is not None:
            clip_in_closure(model.parameters(), max_norm)
        evaluations.append(loss.item())
        return loss

    for _ in range(3):
        opt.step(closure)
    return evaluations, [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("max_norm", [1.0, 1e6])  # every evaluation clipped (norms ~2.2); none
def test_lbfgs_closure_clips_every_evaluation(max_norm):
    """The user's own pattern, clip_grad_norm_ inside the closure so that every evaluation LBFGS
    makes sees clipped gradients: the wrapper does exactly that (bitwise, with gradstats' clip in
    the closure), and matches torch's clip there up to torch's float32 norm."""
    evaluations, params = lbfgs_run(max_norm, None)
    ours_evals, ours_params = lbfgs_run(max_norm, gradstats.clip_grad_norm_)
    torch_evals, torch_params = lbfgs_run(max_norm, torch.nn.utils.clip_grad_norm_)
    assert len(evaluations) > 3 * 3  # LBFGS evaluated several times per step
    assert evaluations == ours_evals
    assert all(torch.equal(a, b) for a, b in zip(params, ours_params))
    torch.testing.assert_close(evaluations, torch_evals, rtol=1e-3, atol=0)
    torch.testing.assert_close(params, torch_params, rtol=1e-3, atol=1e-5)


def test_lbfgs_without_the_wrapper_clips_nothing():
    """The negative control: the same run without any clipping goes elsewhere."""
    clipped, _ = lbfgs_run(1.0, None)
    unclipped, _ = lbfgs_run(1.0, lambda params, max_norm: None)
    assert clipped != unclipped


@pytest.mark.parametrize("name", ["SGD", "Adam", "AdamW", "RMSprop", "Adagrad", "NAdam", "Rprop"])
def test_every_optimizer_takes_a_closure(name):
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    inner = getattr(torch.optim, name)(model.parameters(), lr=0.01)
    opt = gradstats.ClipGradOptimizer(inner, 0.1)
    x, y = torch.randn(8, 4), torch.randn(8, 2)

    def closure():
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    before = [p.detach().clone() for p in model.parameters()]
    loss = opt.step(closure)
    assert isinstance(loss, torch.Tensor) and torch.isfinite(loss)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert opt.last_stats.clip_coef.item() < 1.0  # the step's gradients were clipped


def test_a_non_finite_first_evaluation_skips_the_closure_step():
    model, x, y = lbfgs_problem()
    inner = torch.optim.LBFGS(model.parameters(), max_iter=3)
    opt = gradstats.ClipGradOptimizer(inner, 1.0, on_nonfinite="skip")
    before = [p.detach().clone() for p in model.parameters()]

    def closure():
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y) * math.nan
        loss.backward()
        return loss

    opt.step(closure)
    assert int(opt.skipped_steps) == 1
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert not inner.state


# --- 6. more dimensions than the kernels' walks hold --------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_a_tensor_sliced_in_17_dimensions(device):
    base = torch.randn([3] * 17, device=device, dtype=torch.float64)
    view = base[(slice(None, None, 2),) * 17]  # 2^17 elements, no two dims mergeable
    assert not view.is_contiguous() and view.dim() == 17
    ref = reference_stats([view.cpu()], 2.0, 1.0)
    st = gradstats.grad_stats([view], max_norm=1.0)
    assert_close_rel(st.total_norm.item(), ref.total_norm, NORM_RTOL[torch.float64], "norm")

    param = nn.Parameter(torch.zeros_like(view))
    param.grad = view  # clipped in place through the view
    original = base.clone()
    gradstats.clip_grad_norm_([param], 1.0)
    expected = original.clone()
    expected[(slice(None, None, 2),) * 17] *= ref.clip_coef
    torch.testing.assert_close(base, expected, rtol=1e-12, atol=0)  # outside the view: untouched
    assert ref.clip_coef < 1.0


# --- 8. every norm_type torch accepts, with torch's results --------------------------------------


NORM_TYPES = [0.0, -0.5, -1.0, -2.0, -math.inf, 0.5, 1.0, 2.0, 3.0, math.inf]


def sample_grads(device, kind):
    g = torch.Generator().manual_seed(3)
    grads = [torch.randn(40, generator=g), torch.randn(7, 3, generator=g), torch.zeros(5)]
    grads[1][2, 1] = 0.0
    if kind == "nan":
        grads[0][4] = math.nan
    elif kind == "inf":
        grads[1][0, 0] = math.inf
    elif kind == "all-inf":
        grads[2].fill_(-math.inf)
    return [t.to(device) for t in grads]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("norm_type", NORM_TYPES)
@pytest.mark.parametrize("kind", ["finite", "nan", "inf", "all-inf"])
def test_norm_types_match_torch(device, norm_type, kind):
    ours, theirs = sample_grads(device, kind), sample_grads(device, kind)
    got = gradstats.get_total_norm(ours, norm_type)
    want = torch.nn.utils.get_total_norm(theirs, norm_type)
    assert_close_rel(got.item(), want.item(), NORM_RTOL[torch.float32], f"p={norm_type} {kind}")
    for error_if_nonfinite in (False, True):
        torch_raised = our_raised = False
        p_ours = params_with_grads(sample_grads(device, kind))
        p_theirs = params_with_grads(sample_grads(device, kind))
        try:
            torch.nn.utils.clip_grad_norm_(p_theirs, 1.0, norm_type, error_if_nonfinite)
        except RuntimeError:
            torch_raised = True
        try:
            gradstats.clip_grad_norm_(p_ours, 1.0, norm_type, error_if_nonfinite)
        except RuntimeError:
            our_raised = True
        assert our_raised == torch_raised
        for a, b in zip(p_ours, p_theirs):
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-7, equal_nan=True)


def test_the_norm_type_comparison_can_fail():
    grads = sample_grads("cpu", "finite")
    assert gradstats.get_total_norm(grads, 0.0).item() != gradstats.get_total_norm(grads, 1.0)


def test_empty_generator_warns_as_torch_does():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        norm = gradstats.clip_grad_norm_((p for p in []), 1.0)
    assert norm.item() == 0.0
    assert [str(w.message) for w in caught] == [
        "`parameters` is an empty generator, no gradient clipping will occur."
    ]
    assert caught[0].filename == __file__  # points at the caller, as torch's does
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gradstats.clip_grad_norm_([], 1.0)  # an empty list is no generator: no warning
