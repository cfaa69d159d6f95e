"""Property-based tests (hypothesis) against the float64 oracle: random lists of tensors of every
dtype, zero-size and 0-dim ones, non-contiguous and overlapping views, NaN/Inf/subnormal/huge values
anywhere; every p family and policy; the stats op, the scale op and the optimizer's skip.

The number of examples is bounded (EXAMPLES) so that CI stays quick; HYPOTHESIS_EXAMPLES raises it
for a longer local run.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reference import reference_clipped, reference_stats

import gradstats
from gradstats import ops

EXAMPLES = int(os.environ.get("HYPOTHESIS_EXAMPLES", "60"))
SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,  # the same examples on every run: a CI failure reproduces
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
NORM_TYPES = [0.5, 1.0, 2.0, 3.0, math.inf, 1100.0, 0.0, -1.0, -math.inf]
POLICIES = ["propagate", "skip", "zero"]
LAYOUTS = ["contiguous", "transposed", "strided", "expanded", "zero-dim"]
SPECIALS = ["nan", "inf", "-inf", "subnormal", "huge", "zero"]
# Tolerance of a norm against the oracle: float64 sums everywhere; general p adds pow's rounding.
NORM_RTOL, GENERAL_P_RTOL = 1e-6, 1e-9
MAX_SIZE = 300
# One rounding to each dtype (bfloat16 keeps 8 significant bits).
ROUNDING = {torch.float64: 1e-15, torch.float32: 1e-7, torch.float16: 1e-3, torch.bfloat16: 8e-3}
SUBNORMAL_COEF, SUBNORMAL_RTOL = 1e-30, 1e-3


def special_value(kind: str, dtype: torch.dtype) -> float:
    info = torch.finfo(dtype)
    return {
        "nan": math.nan,
        "inf": math.inf,
        "-inf": -math.inf,
        "subnormal": info.tiny / 4,
        "huge": info.max / 2,
        "zero": 0.0,
    }[kind]


@st.composite
def tensors(draw, writable: bool = False) -> torch.Tensor:
    dtype = draw(st.sampled_from(DTYPES))
    layouts = [layout for layout in LAYOUTS if not (writable and layout == "expanded")]
    layout = draw(st.sampled_from(layouts))
    rows = draw(st.integers(0, 20))
    cols = draw(st.integers(0, MAX_SIZE // 20))
    exponent = draw(st.integers(-30, 30))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(rows + 1, 2 * cols + 1, generator=gen, dtype=torch.float64)
    base = (base * 10.0**exponent).to(dtype)
    if layout == "zero-dim":
        t = base[0, 0].clone()
    elif layout == "transposed":
        t = base.t()
    elif layout == "strided":
        t = base[1:, ::2]
    elif layout == "expanded":
        t = base[:1, : cols + 1].expand(rows + 1, cols + 1)
    else:
        t = base[:rows, :cols].contiguous()
    flat = t.reshape(-1) if t.is_contiguous() or t.dim() == 0 else None
    for kind in draw(st.lists(st.sampled_from(SPECIALS), max_size=3)):
        if t.numel() == 0:
            break
        index = draw(st.integers(0, t.numel() - 1))
        target = flat if flat is not None else base.view(-1)
        target[index % target.numel()] = special_value(kind, dtype)
    return t


def as_float(value: float, dtype: torch.dtype) -> float:
    """value as the op reports it, in its output dtype (float32 overflows to Inf)."""
    return torch.tensor(value, dtype=torch.float64).to(dtype).item()


def close(got: float, want: float, rtol: float) -> bool:
    if math.isnan(want) or math.isinf(want):
        return got == want or (math.isnan(want) and math.isnan(got))
    return abs(got - want) <= rtol * abs(want)


def expected_coef(ref, out_dtype: torch.dtype, max_norm: float, policy: str) -> float:
    """The oracle's coefficient with the op's skip rule: the norm as reported (in out_dtype)."""
    reported = as_float(ref.total_norm, out_dtype)
    if policy == "skip" and (sum(ref.nan_counts) + sum(ref.inf_counts) or math.isinf(reported)):
        return 1.0
    return ref.clip_coef


@SETTINGS
@given(
    items=st.lists(tensors(), min_size=1, max_size=6),
    norm_type=st.sampled_from(NORM_TYPES),
    policy=st.sampled_from(POLICIES),
    max_norm=st.sampled_from([0.0, 1e-3, 1.0, 1e30]),
)
def test_stats_op_matches_the_oracle(items, norm_type, policy, max_norm):
    total, coef, norms, counts = ops.stats(items, norm_type, max_norm, policy)
    ref = reference_stats(items, norm_type, max_norm, policy)
    out = total.dtype
    rtol = NORM_RTOL if norm_type in (1.0, 2.0, math.inf, 0.0) else max(NORM_RTOL, GENERAL_P_RTOL)
    assert counts[0, :-1].tolist() == ref.nan_counts
    assert counts[1, :-1].tolist() == ref.inf_counts
    assert counts[:, -1].tolist() == [
        sum(ref.nan_counts),
        sum(ref.inf_counts),
        sum(ref.nan_counts) + sum(ref.inf_counts),
    ]
    assert close(total.item(), as_float(ref.total_norm, out), rtol), (total, ref.total_norm)
    for got, want in zip(norms.tolist(), ref.norms):
        assert close(got, as_float(want, out), rtol), (got, want)
    want_coef = expected_coef(ref, out, max_norm, policy)
    assert close(coef.item(), as_float(want_coef, out), max(rtol, 1e-6)), (coef, want_coef)


@SETTINGS
@given(
    items=st.lists(tensors(writable=True), min_size=1, max_size=5),
    norm_type=st.sampled_from([0.5, 1.0, 2.0, math.inf, 1100.0]),
    policy=st.sampled_from(POLICIES),
)
def test_clipping_matches_the_oracle(items, norm_type, policy):
    """clip_grad_norm_ end to end: each clipped element is the oracle's product, within one
    rounding to its dtype; untouched where the policy or a coefficient >= 1 says so."""
    params = [torch.nn.Parameter(torch.zeros_like(t)) for t in items]
    for p, t in zip(params, items):
        p.grad = t.clone()
    originals = [t.clone() for t in items]
    ref = reference_stats(originals, norm_type, 1.0, policy)
    out = ops.norm_dtype(originals)
    coef = as_float(expected_coef(ref, out, 1.0, policy), out)
    gradstats.clip_grad_norm_(params, 1.0, norm_type, on_nonfinite=policy)
    # The coefficient is as accurate as the norm (float64 sums; float32 lanes for 16/32-bit
    # inputs), and each element adds one rounding to its own dtype.
    all_double = all(t.dtype == torch.float64 for t in originals)
    coef_rtol = ROUNDING[torch.float64] if all_double else NORM_RTOL
    for p, g0 in zip(params, originals):
        want = reference_clipped(g0, coef, zero_nonfinite=policy == "zero")
        got = p.grad.double()
        rtol = ROUNDING[g0.dtype] + coef_rtol
        if coef < SUBNORMAL_COEF:  # a coefficient in float32's subnormal range has fewer digits
            rtol = max(rtol, SUBNORMAL_RTOL)
        # Results below the dtype's normal range keep fewer digits: an absolute step of tiny.
        atol = torch.finfo(g0.dtype).tiny
        torch.testing.assert_close(got, want.to(got.dtype), rtol=rtol, atol=atol, equal_nan=True)


@SETTINGS
@given(items=st.lists(tensors(writable=True), min_size=1, max_size=5), seed=st.integers(0, 99))
def test_the_optimizer_skips_exactly_the_non_finite_steps(items, seed):
    params = [torch.nn.Parameter(torch.randn_like(t.double()).to(t.dtype)) for t in items]
    for p, t in zip(params, items):
        p.grad = t.clone()
    before = [p.detach().clone() for p in params]
    inner = torch.optim.SGD(params, lr=1e-3, momentum=0.9)
    opt = gradstats.ClipGradOptimizer(inner, 1.0, on_nonfinite="skip")
    ref = reference_stats(items, 2.0, 1.0)
    out = ops.norm_dtype(items)
    nonfinite = sum(ref.nan_counts) + sum(ref.inf_counts) > 0
    overflow = math.isinf(as_float(ref.total_norm, out))
    opt.step()
    if nonfinite or overflow:
        assert int(opt.skipped_steps) == 1
        assert all(torch.equal(a, b) for a, b in zip(before, params))
        assert not inner.state
    else:
        assert int(opt.skipped_steps) == 0
        assert all(torch.isfinite(p).all() for p in params)


def test_the_property_checks_can_fail():
    """close() is strict enough to tell a wrong norm from a right one."""
    assert not close(1.0 + 1e-5, 1.0, NORM_RTOL)
    assert close(math.inf, math.inf, NORM_RTOL) and not close(1.0, math.nan, NORM_RTOL)


@pytest.mark.parametrize("kind", SPECIALS)
def test_special_values_are_representable(kind):
    for dtype in DTYPES:
        value = torch.tensor(special_value(kind, dtype), dtype=dtype).item()
        assert math.isnan(value) == (kind == "nan")
