"""The fused statistics against the float64 oracle: norms, counts, clip coefficient, numerics."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import DEVICES, DTYPES, NORM_RTOL, assert_close_rel, assert_stats_match_oracle
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import reference_stats

import gradstats
from gradstats import ops

NORM_TYPES = [1.0, 2.0, math.inf, 3.0, 0.5]
# Larger than one CPU piece (2^16 elements) and not a multiple of any vector width.
BIG = 3 * (1 << 16) + 17


def check_against_oracle(tensors, norm_type=2.0, max_norm=1.0, policy="propagate"):
    out = ops.stats(tensors, norm_type, max_norm, policy)
    assert_stats_match_oracle(tensors, out, norm_type, max_norm, policy)
    return out


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("norm_type", NORM_TYPES)
def test_norms_match_oracle(device, dtype, norm_type):
    shapes = [(BIG,), (0,), (33, 17), (1,), (5, 0, 3), (1000,)]
    tensors = [torch.randn(s, device=device).to(dtype) for s in shapes]
    check_against_oracle(tensors, norm_type)


@pytest.mark.parametrize("device", DEVICES)
def test_output_dtypes_and_shapes(device):
    half = [torch.randn(10, device=device, dtype=torch.float16)]
    total, coef, norms, counts = ops.stats(half + half, 2.0, 1.0, "propagate")
    assert (total.dtype, coef.dtype, norms.dtype, counts.dtype) == (
        torch.float32,
        torch.float32,
        torch.float32,
        torch.int64,
    )
    assert total.shape == coef.shape == () and norms.shape == (2,) and counts.shape == (3, 3)
    assert total.device.type == device
    mixed = [*half, torch.randn(3, device=device, dtype=torch.float64)]
    assert ops.stats(mixed, 2.0, 1.0, "propagate")[0].dtype == torch.float64


@pytest.mark.parametrize("device", DEVICES)
def test_mixed_dtypes_in_one_call(device):
    tensors = [
        torch.randn(BIG if i == 1 else 777, device=device).to(d) for i, d in enumerate(DTYPES * 2)
    ]
    check_against_oracle(tensors)


@pytest.mark.parametrize("device", DEVICES)
def test_many_small_tensors(device):
    tensors = [torch.randn(i % 7 + 1, device=device) for i in range(5000)]
    check_against_oracle(tensors, max_norm=5.0)


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_tensors(device):
    base = torch.randn(300, 400, device=device)
    tensors = [
        base.t(),  # permuted but dense
        base[:, ::3],  # gaps between elements
        base[10:200, 5:390],  # gaps between rows
        torch.randn(4, 5, 6, device=device).permute(2, 0, 1)[:, 1:, ::2],
        torch.randn(7, 1, device=device).expand(7, 50),  # stride 0: read every logical element
        torch.randn(64, 64, device=device, dtype=torch.bfloat16)[::2, 1:],
    ]
    _, _, norms, _ = check_against_oracle(tensors)
    for t, got in zip(tensors, norms.tolist()):
        want = torch.linalg.vector_norm(t.double()).item()
        assert_close_rel(got, want, 1e-6, "norm of a non-contiguous tensor")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("norm_type", [2.0, 1.0, 3.0, 0.5, math.inf, 0.0, -1.0])
def test_complex_tensors_give_torchs_norm_of_the_moduli(device, norm_type):
    """torch.linalg.vector_norm of a complex tensor is the norm of its moduli, for every order (the
    real view agrees only for p = 2); the conjugate has the same moduli."""
    z = torch.randn(1000, dtype=torch.complex64, device=device)
    z[7] = 0  # a zero element: it counts for p = 0 and decides p < 0
    total = ops.stats([z, z.conj()], norm_type, 1.0, "propagate")[0]
    want = gradstats.get_total_norm([z.cdouble().abs(), z.cdouble().abs()], norm_type)
    torch_norms = torch.stack([torch.linalg.vector_norm(t.cdouble(), norm_type) for t in (z, z)])
    assert_close_rel(total.item(), want.item(), 1e-6, f"complex norm, p={norm_type}")
    if norm_type not in (0.0,):  # torch's norm of norms counts nonzero norms for p = 0
        want_torch = torch.linalg.vector_norm(torch_norms, norm_type).item()
        assert_close_rel(total.item(), want_torch, 1e-6, f"against torch, p={norm_type}")


@pytest.mark.parametrize("device", DEVICES)
def test_a_complex_element_with_nan_counts_once(device):
    z = torch.randn(10, dtype=torch.complex64, device=device)
    z[3] = complex(math.nan, 1.0)
    z[5] = complex(math.nan, math.nan)
    z[8] = complex(math.inf, 0.0)
    counts = ops.stats([z], 2.0, 1.0, "propagate")[3]
    assert counts[:, 0].tolist() == [2, 1, 3]  # NaN, Inf, NaN + Inf: per complex element


def test_the_real_view_would_differ_for_p_other_than_2():
    """Negative control: the real view's 1-norm is not torch's (why the moduli are read)."""
    z = torch.randn(1000, dtype=torch.complex64)
    real_view = torch.linalg.vector_norm(torch.view_as_real(z).double(), 1.0).item()
    torch_value = torch.linalg.vector_norm(z.cdouble(), 1.0).item()
    assert abs(real_view - torch_value) > 1e-3 * torch_value


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_nonfinite_counts_are_exact(device, dtype):
    tensors = [torch.randn(BIG, device=device).to(dtype), torch.randn(50, device=device).to(dtype)]
    tensors[0][[0, 5, 70000, BIG - 1]] = float("nan")
    tensors[0][[1, 65536]] = float("inf")
    tensors[0][[2]] = -float("inf")
    tensors[1][7] = float("nan")
    for policy in ("propagate", "skip", "zero"):
        total, coef, _, counts = check_against_oracle(tensors, 2.0, 1.0, policy)
        assert counts.tolist() == [[4, 1, 5], [3, 0, 3], [7, 1, 8]]
        if policy == "zero":
            assert math.isfinite(total.item()) and 0 < coef.item() < 1
        else:
            assert math.isnan(total.item())
        if policy == "skip":
            assert coef.item() == 1.0


@pytest.mark.parametrize("device", DEVICES)
def test_inf_without_nan_gives_inf_norm_and_zero_coefficient(device):
    tensors = [torch.randn(100, device=device), torch.tensor([1.0, -math.inf], device=device)]
    total, coef, norms, _ = check_against_oracle(tensors, 2.0, 1.0)
    assert total.item() == math.inf and coef.item() == 0.0
    assert norms[1].item() == math.inf and math.isfinite(norms[0].item())


@pytest.mark.parametrize("device", DEVICES)
def test_no_spurious_overflow(device):
    """Finite inputs whose squares overflow their own dtype still give the right norm."""
    big32 = torch.full((1000,), 1e20, device=device)  # squares 1e40 > float32 max
    big16 = torch.full((10_000,), 1000.0, device=device, dtype=torch.float16)  # norm 1e5 > 65504
    huge64 = torch.full((1000,), 1e200, device=device, dtype=torch.float64)  # squares > float64 max
    for tensors in ([big32], [big16], [huge64], [big32, big16]):
        check_against_oracle(tensors)
    assert_close_rel(ops.stats([big16], 2.0, 1.0, "propagate")[0].item(), 1e5, 1e-6, "fp16 norm")
    assert_close_rel(
        ops.stats([huge64], 2.0, 1.0, "propagate")[0].item(),
        1e200 * math.sqrt(1000),
        1e-12,
        "fp64 norm",
    )
    # Large exponents overflow float64 for ordinary values too: 1e20^16 = 1e320.
    check_against_oracle([big32], norm_type=16.0)


@pytest.mark.parametrize("device", DEVICES)
def test_tiny_values_do_not_underflow(device):
    """Squares of tiny float32 gradients underflow float32; vanishing-gradient norms need them."""
    tiny = [torch.full((5000,), 1e-25, device=device), torch.full((70000,), 3e-41, device=device)]
    check_against_oracle(tiny)
    assert ops.stats([torch.zeros(BIG, device=device)], 2.0, 1.0, "propagate")[0].item() == 0.0


@pytest.mark.parametrize("device", DEVICES)
def test_bitwise_deterministic_across_runs(device):
    tensors = [torch.randn(BIG, device=device) * 1e3, torch.randn(5000, device=device).half()]
    first = ops.stats(tensors, 2.0, 1.0, "propagate")
    for _ in range(3):
        again = ops.stats(tensors, 2.0, 1.0, "propagate")
        for a, b in zip(first, again):
            assert torch.equal(a, b)


def test_bitwise_deterministic_across_thread_counts():
    tensors = [torch.randn(BIG * 3), torch.randn(BIG).bfloat16(), torch.randn(9999).double()]
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2, 3, 7):
            torch.set_num_threads(n)
            results.append([ops.stats(tensors, p, 1.0, "propagate")[0] for p in NORM_TYPES])
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        assert all(a.item() == b.item() for a, b in zip(results[0], other))


@pytest.mark.parametrize("device", DEVICES)
def test_float32_relative_error_below_1e6_on_a_large_input(device):
    x = torch.randn(4_000_000, device=device) * torch.rand(4_000_000, device=device) * 10
    total = ops.stats([x], 2.0, 1.0, "propagate")[0].item()
    want = torch.linalg.vector_norm(x.double()).item()
    assert abs(total - want) <= 1e-6 * want


def test_negative_control_oracle_comparison_can_fail():
    """The oracle comparison notices a wrong norm: a perturbed tensor gives a different result."""
    x = torch.randn(1000)
    ref = reference_stats([x * (1 + 1e-5)])
    total = ops.stats([x], 2.0, 1.0, "propagate")[0].item()
    with pytest.raises(AssertionError):
        assert_close_rel(total, ref.total_norm, NORM_RTOL[torch.float32])


@settings(max_examples=40, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 3000), min_size=1, max_size=6),
    dtypes=st.lists(st.sampled_from(DTYPES), min_size=6, max_size=6),
    norm_type=st.sampled_from(NORM_TYPES),
    scale=st.sampled_from([1e-3, 1.0, 1e4]),
    max_norm=st.one_of(st.just(0.0), st.floats(1e-3, 100.0)),
)
def test_random_parameter_sets(sizes, dtypes, norm_type, scale, max_norm):
    tensors = [(torch.randn(n) * scale).to(d) for n, d in zip(sizes, dtypes)]
    check_against_oracle(tensors, norm_type, max_norm)


@pytest.mark.parametrize("device", DEVICES)
def test_grad_stats_fields(device):
    params = [torch.nn.Parameter(torch.randn(20, device=device)) for _ in range(3)]
    params[0].grad = torch.randn(20, device=device)
    params[2].grad = torch.randn(20, device=device)
    params[2].grad[3] = float("inf")
    s = gradstats.grad_stats(params, max_norm=1.0)
    assert s.num_tensors == 2  # the parameter without a gradient is skipped
    assert s.nonfinite.tolist() == [0, 1] and s.inf_count.item() == 1 and s.nan_count.item() == 0
    assert s.total_norm.item() == math.inf and s.clip_coef.item() == 0.0
    d = s.to_dict(["a", "b"])
    assert d["nonfinite"] == {"a": 0, "b": 1} and d["inf_count"] == 1
    assert d["norms"]["a"] == pytest.approx(params[0].grad.norm().item(), rel=1e-6)
    assert gradstats.grad_stats(params, per_tensor=False).norms is None
    assert gradstats.grad_stats(params).clip_coef is None


@pytest.mark.parametrize("device", DEVICES)
def test_grad_stats_reads_plain_tensors_and_empty_lists(device):
    x = torch.randn(100, device=device)
    assert_close_rel(gradstats.grad_stats(x).total_norm.item(), x.double().norm().item(), 1e-6)
    empty = gradstats.grad_stats([])
    assert empty.total_norm.item() == 0.0 and empty.num_tensors == 0


@pytest.mark.parametrize("device", DEVICES)
def test_count_nonfinite(device):
    x = torch.randn(10, 10, device=device)
    x[0, 0], x[1, 1], x[2, 2] = float("nan"), float("inf"), -float("inf")
    y = torch.randn(5, device=device, dtype=torch.float16)
    assert gradstats.count_nonfinite(x).item() == 3 and gradstats.count_nonfinite(x).dim() == 0
    assert gradstats.count_nonfinite([x, y]).tolist() == [3, 0]
    assert gradstats.count_nonfinite([]).numel() == 0


def test_grad_stats_item_rules():
    """Parameters and leaves that require grad give their .grad; other tensors are read as is."""
    frozen = torch.nn.Parameter(torch.randn(5), requires_grad=False)  # no grad: skipped
    trained = torch.nn.Parameter(torch.randn(5))
    trained.grad = torch.full((5,), 2.0)
    leaf = torch.randn(5, requires_grad=True)  # a leaf without a gradient yet: skipped
    activation = torch.randn(5, requires_grad=True) * 1.0  # not a leaf: read as is
    plain = torch.full((5,), 3.0)
    s = gradstats.grad_stats([frozen, trained, leaf, activation, plain])
    assert s.num_tensors == 3
    want = [trained.grad.norm().item(), activation.detach().norm().item(), plain.norm().item()]
    assert s.norms.tolist() == pytest.approx(want, rel=1e-6)
    assert not s.total_norm.requires_grad


def test_statistics_of_tensors_that_require_grad_do_not_require_grad():
    x = torch.randn(10, requires_grad=True) * 2.0
    norm = gradstats.get_total_norm([x])
    assert not norm.requires_grad
    assert_close_rel(norm.item(), x.detach().double().norm().item(), 1e-6, "norm")
    assert gradstats.count_nonfinite(x).item() == 0
