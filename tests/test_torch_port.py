"""PyTorch's own unit tests of the clipping functions, ported from pytorch/pytorch test/test_nn.py
(TestNNDeviceType: test_clip_grad_value, test_clip_grad_norm,
test_clip_grad_norm_error_if_nonfinite, test_clip_grad_norm_multi_device), run against
torch.nn.utils and gradstats alike.

The port keeps their inputs and assertions (unittest's assertEqual is torch.testing.assert_close
with its default tolerances, the same as here). The one difference allowed is a documented
improvement, marked where it applies: float64 gradients of 2e200 whose p-norm torch overflows to
Inf (so torch raises under error_if_nonfinite) have an exact, finite gradstats norm.
"""

from __future__ import annotations

import math
import warnings
from itertools import product

import pytest
import torch
from helpers import DEVICES
from torch import nn

import gradstats

inf, nan = math.inf, math.nan

IMPLEMENTATIONS = {
    "torch": torch.nn.utils,
    "gradstats": gradstats,
}


@pytest.fixture(params=list(IMPLEMENTATIONS))
def impl(request):
    return request.param


def api(impl: str):
    return IMPLEMENTATIONS[impl]


assert_equal = torch.testing.assert_close


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("foreach", [False, True])
def test_clip_grad_value(impl, device, foreach):
    clip_grad_value_ = api(impl).clip_grad_value_
    layer = nn.Linear(10, 10).to(device)
    clip_value = 2.5

    grad_w = torch.arange(-50.0, 50, device=device).view(10, 10).div_(5)
    grad_b = torch.ones(10, device=device).mul_(2)
    for grad_list in [[grad_w, grad_b], [grad_w, None]]:
        for p, g in zip(layer.parameters(), grad_list):
            p._grad = g.clone().view_as(p.data) if g is not None else g

        clip_grad_value_(layer.parameters(), clip_value, foreach=foreach)
        for p in filter(lambda p: p.grad is not None, layer.parameters()):
            assert p.grad.data.max() <= clip_value
            assert p.grad.data.min() >= -clip_value

    # Should accept a single Tensor as input
    p1, p2 = torch.randn(10, 10, device=device), torch.randn(10, 10, device=device)
    g = torch.arange(-50.0, 50, device=device).view(10, 10).div_(5)
    p1._grad = g.clone()
    p2._grad = g.clone()
    clip_grad_value_(p1, clip_value, foreach=foreach)
    clip_grad_value_([p2], clip_value, foreach=foreach)
    assert_equal(p1.grad, p2.grad)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("norm_type", [0.5, 1.5, 2, 4, "inf"])
def test_clip_grad_norm(impl, device, foreach, norm_type):
    utils = api(impl)
    layer = nn.Linear(10, 10).to(device)
    max_norm = 2

    def compute_norm(norm_type):
        norm_type = float(norm_type)
        if norm_type != inf:
            total_norm = 0
            for p in layer.parameters():
                total_norm += p.grad.data.abs().pow(norm_type).sum()
            return pow(total_norm, 1.0 / norm_type)
        return max(p.grad.data.abs().max() for p in layer.parameters())

    def compare_scaling(grads):
        p_scale = [p.grad.data.div(g).view(-1) for p, g in zip(layer.parameters(), grads)]
        scale = torch.cat(p_scale)
        assert_equal(scale.std(), torch.zeros((), device=device))
        return scale[0]

    grads = (
        torch.arange(1.0, 101, device=device).view(10, 10),
        torch.ones(10, device=device).div(1000),
    )
    for p, g in zip(layer.parameters(), grads):
        p._grad = g.clone().view_as(p.data)
    norm_before = compute_norm(norm_type)
    norm = utils.clip_grad_norm_(layer.parameters(), max_norm, norm_type=norm_type, foreach=foreach)
    norm_after = compute_norm(norm_type)
    assert_equal(norm, norm_before)
    assert_equal(norm_after, torch.tensor(float(max_norm), device=device))
    assert norm_after <= norm_before
    compare_scaling(grads)

    # decomposed APIs should behave as expected
    grads = (
        torch.arange(1.0, 101, device=device).view(10, 10),
        torch.ones(10, device=device).div(1000),
    )
    for p, g in zip(layer.parameters(), grads):
        p._grad = g.clone().view_as(p)
    norm_before = compute_norm(norm_type)
    grads = [p.grad for p in layer.parameters()]
    total_norm = utils.get_total_norm(grads, norm_type=norm_type, foreach=foreach)
    utils.clip_grads_with_norm_(layer.parameters(), max_norm, total_norm, foreach=foreach)
    norm_after = compute_norm(norm_type)
    assert_equal(total_norm, norm_before)
    assert_equal(norm_after, torch.tensor(float(max_norm), device=device))
    assert norm_after <= norm_before
    compare_scaling(grads)

    # Small gradients should be left unchanged
    grads = (
        torch.rand(10, 10, device=device).div(10000),
        torch.ones(10, device=device).div(500),
    )
    for p, g in zip(layer.parameters(), grads):
        p.grad.data.copy_(g)
    norm_before = compute_norm(norm_type)
    norm = utils.clip_grad_norm_(layer.parameters(), max_norm, norm_type=norm_type, foreach=foreach)
    norm_after = compute_norm(norm_type)
    assert_equal(norm, norm_before)
    assert_equal(norm_before, norm_after)
    assert norm_after <= max_norm
    scale = compare_scaling(grads)
    assert_equal(scale, torch.ones((), device=device))

    # Should accept a single Tensor as input
    p1, p2 = torch.randn(10, 10, device=device), torch.randn(10, 10, device=device)
    g = torch.arange(1.0, 101, device=device).view(10, 10)
    p1._grad = g.clone()
    p2._grad = g.clone()
    utils.clip_grad_norm_(p1, max_norm, norm_type=norm_type, foreach=foreach)
    utils.clip_grad_norm_([p2], max_norm, norm_type=norm_type, foreach=foreach)
    assert_equal(p1.grad, p2.grad)

    # Should warning when parameters generator exhausted
    params = layer.parameters()
    for _ in params:
        pass
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        utils.clip_grad_norm_(params, max_norm, norm_type=norm_type, foreach=foreach)
        assert len(w) == 1
        assert (
            str(w[0].message)
            == "`parameters` is an empty generator, no gradient clipping will occur."
        )


NORMS_POS = [0.1, 1, 2, 3.5, inf]
NORMS_NEG = [-0.1, -1, -2, -3.5]
NORMS_EXCEPT_0 = NORMS_POS + NORMS_NEG
NORMS_ALL = [*NORMS_EXCEPT_0, 0]

# (grad_only_one_elem, prefix_finite_grad_param, scalars, norms_nonfinite, norms_finite), as in
# torch's test: the norm types whose total norm torch finds non-finite, and those it finds finite.
ERROR_IF_NONFINITE_CASES = [
    # Test errors from an infinite grad
    (False, False, [inf, -inf], NORMS_EXCEPT_0, [0]),
    (False, True, [inf, -inf], NORMS_POS, [*NORMS_NEG, 0]),
    (True, False, [inf, -inf], NORMS_POS, [*NORMS_NEG, 0]),
    (True, True, [inf, -inf], NORMS_POS, [*NORMS_NEG, 0]),
    # Test errors from a NaN grad
    (False, False, [nan], NORMS_EXCEPT_0, [0]),
    (False, True, [nan], NORMS_EXCEPT_0, [0]),
    (True, False, [nan], NORMS_EXCEPT_0, [0]),
    (True, True, [nan], NORMS_EXCEPT_0, [0]),
    # Test a grad that should never error
    (False, False, [2e22, -2e22], [], NORMS_ALL),
    (False, True, [2e22, -2e22], [], NORMS_ALL),
    (True, False, [2e22, -2e22], [], NORMS_ALL),
    (True, True, [2e22, -2e22], [], NORMS_ALL),
    # Test a grad that will overflow to inf for only some norm orders
    (False, False, [2e200, -2e200], [3.5, 2, -2, -3.5], [inf, 1, 0.1, 0, -1, -0.1]),
    (False, True, [2e200, -2e200], [3.5, 2], [*NORMS_NEG, inf, 1, 0.1, 0]),
    (True, False, [2e200, -2e200], [3.5, 2], [*NORMS_NEG, inf, 1, 0.1, 0]),
    (True, True, [2e200, -2e200], [3.5, 2], [*NORMS_NEG, inf, 1, 0.1, 0]),
]
# Documented improvement: gradstats sums on the scale of the largest element, so the float64 norms
# of 2e200 gradients that torch overflows to Inf are exact and finite; torch raises on them.
OVERFLOWS_IN_TORCH_ONLY = 2e200


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("case", ERROR_IF_NONFINITE_CASES)
def test_clip_grad_norm_error_if_nonfinite(impl, device, foreach, case):
    clip_grad_norm_ = api(impl).clip_grad_norm_
    grad_only_one_elem, prefix_finite_grad_param, scalars, norms_nonfinite, norms_finite = case
    if impl == "gradstats" and abs(scalars[0]) == OVERFLOWS_IN_TORCH_ONLY:
        norms_nonfinite, norms_finite = [], [*norms_nonfinite, *norms_finite]

    def gen_parameters(scalar, grad_only_one_elem, prefix_finite_grad_param):
        param = torch.ones(10, dtype=torch.float64, device=device, requires_grad=True)

        if grad_only_one_elem:
            param[1].mul(scalar).sum().backward()
        else:
            param.mul(scalar).sum().backward()

        if prefix_finite_grad_param:
            prefix_param = torch.ones(1, dtype=torch.float64, device=device, requires_grad=True)
            prefix_param.mul(1).sum().backward()
            parameters = [prefix_param, param]
        else:
            parameters = [param]

        return parameters

    def run_test_case(norm_type, error_if_nonfinite, scalar, is_norm_nonfinite):
        msg = (
            f"norm_type: {norm_type}, error_if_nonfinite: {error_if_nonfinite}, "
            f"scalar: {scalar}, grad_only_one_elem: {grad_only_one_elem}, "
            f"prefix_finite_grad_param: {prefix_finite_grad_param}, "
            f"is_norm_nonfinite: {is_norm_nonfinite}"
        )

        parameters = gen_parameters(scalar, grad_only_one_elem, prefix_finite_grad_param)

        # Should only throw an error if the total norm is expected to be
        # nonfinite and `error_if_nonfinite=True`
        if is_norm_nonfinite and error_if_nonfinite:
            error_msg = f"The total norm of order {float(norm_type)} for gradients"

            grads_before = [p.grad.clone() for p in parameters]

            with pytest.raises(RuntimeError, match=error_msg):
                clip_grad_norm_(
                    parameters, 1, norm_type=norm_type, error_if_nonfinite=True, foreach=foreach
                )

            # Grad should not change if error is thrown
            grads_after = [p.grad for p in parameters]
            assert_equal(grads_before, grads_after, equal_nan=True, msg=msg)
        else:
            clip_grad_norm_(
                parameters,
                1,
                norm_type=norm_type,
                error_if_nonfinite=error_if_nonfinite,
                foreach=foreach,
            )

    for error_if_nonfinite in [False, True]:
        for norm_type, scalar in product(norms_nonfinite, scalars):
            run_test_case(norm_type, error_if_nonfinite, scalar, True)

        for norm_type, scalar in product(norms_finite, scalars):
            run_test_case(norm_type, error_if_nonfinite, scalar, False)


@pytest.mark.multi_gpu
@pytest.mark.parametrize("foreach", [False, True])
def test_clip_grad_norm_multi_device(impl, foreach):
    clip_grad_norm_ = api(impl).clip_grad_norm_
    devices = ["cuda:0", "cuda:1"]

    class TestModel(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layer1 = nn.Linear(10, 10)
            self.layer2 = nn.Linear(10, 10)

    test_model = TestModel()
    test_model.layer1.to(devices[0])
    test_model.layer2.to(devices[1])
    ref_model = TestModel().to(devices[0])
    for norm_type in [2.0, math.inf]:
        for p in test_model.parameters():
            p.grad = torch.ones_like(p)
        for p in ref_model.parameters():
            p.grad = torch.ones_like(p)
        norm = clip_grad_norm_(test_model.parameters(), 0.5, norm_type=norm_type, foreach=foreach)
        expected = clip_grad_norm_(
            ref_model.parameters(), 0.5, norm_type=norm_type, foreach=foreach
        )
        assert_equal(norm, expected)
        for p, pe in zip(test_model.parameters(), ref_model.parameters()):
            assert_equal(p.grad.to(devices[0]), pe.grad)


def test_the_port_can_fail():
    """The error_if_nonfinite check above is not vacuous: on torch, the documented 2e200 row does
    raise (gradients untouched), where gradstats returns the exact norm and clips."""
    param = torch.ones(10, dtype=torch.float64, requires_grad=True)
    param.mul(OVERFLOWS_IN_TORCH_ONLY).sum().backward()
    before = param.grad.clone()
    with pytest.raises(RuntimeError, match="non-finite"):
        torch.nn.utils.clip_grad_norm_([param], 1, norm_type=2, error_if_nonfinite=True)
    assert torch.equal(param.grad, before)
    norm = gradstats.clip_grad_norm_([param], 1, error_if_nonfinite=True)
    assert norm.item() == pytest.approx(OVERFLOWS_IN_TORCH_ONLY * math.sqrt(10), rel=1e-12)
    assert torch.linalg.vector_norm(param.grad).item() == pytest.approx(1.0, rel=1e-9)
