"""The torch.nn.utils drop-ins against torch itself and the float64 oracle, and the scale_ op."""

from __future__ import annotations

import math
import mmap
import subprocess
import sys
import textwrap

import pytest
import torch
from helpers import (
    CLIP_RTOL,
    DEVICES,
    DTYPES,
    TORCH_NORM_RTOL,
    assert_close_rel,
    child_env,
)
from reference import reference_clipped, reference_stats

import gradstats
from gradstats import ops


def make_params(device, dtype, shapes=((300, 200), (17,), (0,), (70000,), (3, 1, 5))):
    params = [torch.nn.Parameter(torch.randn(s, device=device).to(dtype)) for s in shapes]
    for p in params:
        p.grad = torch.randn_like(p)
    return params


def clone_params(params):
    out = []
    for p in params:
        q = torch.nn.Parameter(p.detach().clone())
        q.grad = None if p.grad is None else p.grad.clone()
        out.append(q)
    return out


def assert_grads_clipped(params, originals, coef, dtype, zero_nonfinite=False):
    rtol = CLIP_RTOL[dtype]
    for p, g0 in zip(params, originals):
        want = reference_clipped(g0, coef, zero_nonfinite)
        got = p.grad.detach().cpu().to(want.dtype)
        assert torch.allclose(got, want, rtol=rtol, atol=rtol * 1e-3, equal_nan=True), (
            f"clipped gradient differs: max abs error {(got - want).abs().max().item()}"
        )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("norm_type", [2.0, 1.0, math.inf, 3.0])
@pytest.mark.parametrize("max_norm", [0.5, 1e9])
def test_clip_grad_norm_matches_torch_and_oracle(device, dtype, norm_type, max_norm):
    ours = make_params(device, dtype)
    # torch's inf norm raises on empty tensors (ours counts them as 0); they add nothing to a norm.
    theirs = clone_params([p for p in ours if p.numel() > 0])
    originals = [p.grad.clone() for p in ours]
    ref = reference_stats(originals, norm_type, max_norm)

    norm = gradstats.clip_grad_norm_(ours, max_norm, norm_type)
    torch_norm = torch.nn.utils.clip_grad_norm_(theirs, max_norm, norm_type)

    expected_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    assert norm.dtype == expected_dtype and norm.shape == () and norm.device.type == device
    assert_close_rel(norm.item(), ref.total_norm, 1e-6, "norm vs oracle")
    assert_grads_clipped(ours, originals, ref.clip_coef, dtype)
    if not torch.isfinite(torch_norm):
        # torch sums 16-bit gradients in their own dtype and overflows; ours is the oracle's.
        assert dtype in (torch.float16, torch.bfloat16) and math.isfinite(norm.item())
        return
    assert_close_rel(norm.item(), torch_norm.item(), TORCH_NORM_RTOL[dtype], "norm vs torch")
    for p, q in zip([p for p in ours if p.numel() > 0], theirs):
        assert torch.allclose(
            p.grad.float(), q.grad.float(), rtol=2 * CLIP_RTOL[dtype], atol=1e-6
        ), "clipped gradients differ from torch's"


@pytest.mark.parametrize("device", DEVICES)
def test_nothing_to_clip_leaves_gradients_bitwise_unchanged(device):
    params = make_params(device, torch.float32)
    before = [p.grad.clone() for p in params]
    gradstats.clip_grad_norm_(params, max_norm=1e9)
    assert all(torch.equal(p.grad, b) for p, b in zip(params, before))


def test_generators_single_tensors_and_missing_grads():
    params = make_params("cpu", torch.float32)
    params.append(torch.nn.Parameter(torch.randn(4)))  # no gradient: skipped
    want = torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in params[:-1]]).double())
    norm = gradstats.clip_grad_norm_((p for p in params), 1e9)
    assert_close_rel(norm.item(), want.item(), 1e-6, "norm from a generator")
    single = make_params("cpu", torch.float32, shapes=((10,),))[0]
    assert_close_rel(
        gradstats.clip_grad_norm_(single, 1e9).item(),
        single.grad.double().norm().item(),
        1e-6,
        "norm of one tensor",
    )
    assert gradstats.clip_grad_norm_([], 1.0).item() == 0.0
    assert gradstats.clip_grad_norm_([torch.nn.Parameter(torch.ones(3))], 1.0).item() == 0.0


@pytest.mark.parametrize("device", DEVICES)
def test_float16_norm_above_65504_is_clipped_not_zeroed(device):
    """torch computes this norm in float16, gets Inf and zeroes the gradients; we clip them."""
    (ours,) = make_params(device, torch.float16, shapes=((10_000,),))
    ours.grad.fill_(1000.0)
    (theirs,) = clone_params([ours])
    norm = gradstats.clip_grad_norm_([ours], max_norm=1.0)
    torch_norm = torch.nn.utils.clip_grad_norm_([theirs], max_norm=1.0)
    assert_close_rel(norm.item(), 1e5, 1e-6, "float16 norm")
    assert torch.isinf(torch_norm) and torch.all(theirs.grad == 0)
    assert torch.allclose(ours.grad.float(), torch.full_like(ours.grad.float(), 1e-2), rtol=1e-3)


@pytest.mark.parametrize("device", DEVICES)
def test_float32_gradient_of_1e20(device):
    (ours,) = make_params(device, torch.float32, shapes=((1000,),))
    ours.grad.fill_(1e20)
    (theirs,) = clone_params([ours])
    norm = gradstats.clip_grad_norm_([ours], max_norm=2.0)
    torch.nn.utils.clip_grad_norm_([theirs], max_norm=2.0)
    assert_close_rel(norm.item(), 1e20 * math.sqrt(1000), 1e-6, "norm")
    assert_close_rel(ours.grad.double().norm().item(), 2.0, 1e-5, "clipped norm")
    assert torch.all(theirs.grad == 0)  # torch's float32 norm overflowed to Inf


def inject_nonfinite(params):
    params[0].grad[0, 0] = float("nan")
    params[0].grad[1, 1] = float("inf")
    params[3].grad[5] = -float("inf")


@pytest.mark.parametrize("device", DEVICES)
def test_propagate_gives_torchs_outcome(device):
    ours = make_params(device, torch.float32)
    inject_nonfinite(ours)
    theirs = clone_params(ours)
    norm = gradstats.clip_grad_norm_(ours, 1.0)
    torch_norm = torch.nn.utils.clip_grad_norm_(theirs, 1.0)
    assert math.isnan(norm.item()) and math.isnan(torch_norm.item())
    for p, q in zip(ours, theirs):
        assert torch.equal(torch.isnan(p.grad), torch.isnan(q.grad))


@pytest.mark.parametrize("device", DEVICES)
def test_skip_leaves_gradients_untouched(device):
    params = make_params(device, torch.float32)
    inject_nonfinite(params)
    before = [p.grad.clone() for p in params]
    norm = gradstats.clip_grad_norm_(params, 1.0, on_nonfinite="skip")
    assert math.isnan(norm.item())
    for p, b in zip(params, before):
        assert torch.equal(p.grad.nan_to_num(7.0), b.nan_to_num(7.0))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_zero_zeroes_nonfinite_and_clips_by_the_finite_norm(device, dtype):
    params = make_params(device, dtype)
    inject_nonfinite(params)
    originals = [p.grad.clone() for p in params]
    ref = reference_stats(originals, 2.0, 1.0, "zero")
    norm = gradstats.clip_grad_norm_(params, 1.0, on_nonfinite="zero")
    assert_close_rel(norm.item(), ref.total_norm, 1e-6, "finite norm")
    assert all(torch.isfinite(p.grad).all() for p in params)
    assert_grads_clipped(params, originals, ref.clip_coef, dtype, zero_nonfinite=True)


@pytest.mark.parametrize("device", DEVICES)
def test_zero_policy_zeroes_even_when_nothing_is_clipped(device):
    params = make_params(device, torch.float32)
    inject_nonfinite(params)
    originals = [p.grad.clone() for p in params]
    gradstats.clip_grad_norm_(params, 1e9, on_nonfinite="zero")
    assert_grads_clipped(params, originals, 1.0, torch.float32, zero_nonfinite=True)
    assert torch.equal(params[1].grad, originals[1])  # a finite tensor is not even rewritten


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("how", ["error_if_nonfinite", "on_nonfinite"])
def test_error_names_tensors_and_leaves_gradients_untouched(device, how):
    params = make_params(device, torch.float32)
    inject_nonfinite(params)
    before = [p.grad.clone() for p in params]
    kwargs = (
        {"error_if_nonfinite": True} if how == "error_if_nonfinite" else {"on_nonfinite": "error"}
    )
    with pytest.raises(RuntimeError, match="non-finite") as info:
        gradstats.clip_grad_norm_(params, 1.0, **kwargs)
    message = str(info.value)
    assert "tensor 0 (shape (300, 200), torch.float32): 1 NaN, 1 Inf" in message
    assert "tensor 3 (shape (70000,), torch.float32): 0 NaN, 1 Inf" in message
    assert "2 of 5 tensors" in message
    for p, b in zip(params, before):
        assert torch.equal(p.grad.nan_to_num(7.0), b.nan_to_num(7.0))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_get_total_norm(device, dtype):
    grads = [p.grad for p in make_params(device, dtype)]
    norm = gradstats.get_total_norm(grads, 3.0)
    ref = reference_stats(grads, 3.0)
    assert_close_rel(norm.item(), ref.total_norm, 1e-6, "total norm")
    theirs = torch.nn.utils.get_total_norm(grads, 3.0).item()
    assert_close_rel(norm.item(), theirs, TORCH_NORM_RTOL[dtype], "vs torch")
    grads[1][0] = float("nan")
    with pytest.raises(RuntimeError, match="tensor 1"):
        gradstats.get_total_norm(grads, error_if_nonfinite=True)
    assert gradstats.get_total_norm([]).item() == 0.0


@pytest.mark.parametrize("device", DEVICES)
def test_clip_grads_with_norm_(device):
    ours = make_params(device, torch.float32)
    theirs = clone_params(ours)
    originals = [p.grad.clone() for p in ours]
    total = gradstats.get_total_norm([p.grad for p in ours])
    gradstats.clip_grads_with_norm_(ours, 0.25, total)
    assert_grads_clipped(ours, originals, 0.25 / (total.item() + 1e-6), torch.float32)
    torch.nn.utils.clip_grads_with_norm_(theirs, 0.25, total)
    for p, q in zip(ours, theirs):
        assert torch.allclose(p.grad, q.grad, rtol=1e-6, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_clip_grad_value_(device):
    ours = make_params(device, torch.bfloat16) + make_params(device, torch.float32)
    ours[0].grad[0, 0] = float("nan")
    theirs = clone_params(ours)
    gradstats.clip_grad_value_(ours, 0.5)
    torch.nn.utils.clip_grad_value_(theirs, 0.5)
    for p, q in zip(ours, theirs):
        assert torch.equal(p.grad.nan_to_num(9.0), q.grad.nan_to_num(9.0))
    assert ours[1].grad.abs().max().item() <= 0.5


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_scale_in_place_on_non_contiguous_tensors(device, dtype):
    base = torch.randn(200, 300, device=device).to(dtype)
    coef = torch.tensor(0.5, device=device)
    for view in (lambda b: b.t(), lambda b: b[:, ::3], lambda b: b[5:150, 7:290]):
        data = base.clone()
        original = view(data).clone()
        ops.scale_([view(data)], coef)
        want = reference_clipped(original, 0.5)
        assert torch.allclose(view(data).double().cpu(), want, rtol=CLIP_RTOL[dtype])


@pytest.mark.parametrize("device", DEVICES)
def test_scale_of_a_view_leaves_the_rest_of_the_storage_alone(device):
    base = torch.randn(100, 100, device=device)
    before = base.clone()
    ops.scale_([base[::2, 10:20]], torch.tensor(0.25, device=device))
    mask = torch.zeros_like(base, dtype=torch.bool)
    mask[::2, 10:20] = True
    assert torch.equal(base[~mask], before[~mask])
    assert torch.allclose(base[mask], before[mask] * 0.25)


def test_scale_keeps_signaling_nan_bits_when_nothing_is_clipped():
    """A multiply by 1 would quiet a signalling NaN; its bits surviving shows no write happened."""
    signalling_nan = 0x7F800001
    x = torch.full((1000,), signalling_nan, dtype=torch.int32).view(torch.float32)
    ops.scale_([x], torch.tensor(1.0))
    assert x.view(torch.int32).eq(signalling_nan).all()
    ops.scale_([x], torch.tensor(0.5))
    assert not x.view(torch.int32).eq(signalling_nan).any()  # negative control: a write quiets it


SCALE_ON_INACCESSIBLE_MEMORY = textwrap.dedent(
    """
    import mmap, sys, torch, gradstats
    from gradstats import ops
    n = 1 << 20
    buf = mmap.mmap(-1, 4 * n)
    x = torch.frombuffer(buf, dtype=torch.float32)
    import ctypes
    libc = ctypes.CDLL(None)
    addr = x.data_ptr()
    assert libc.mprotect(ctypes.c_void_p(addr), ctypes.c_size_t(4 * n), 0) == 0
    ops.scale_([x], torch.tensor(float(sys.argv[1])))
    print("survived")
    """
)


@pytest.mark.parametrize(("coef", "survives"), [(1.0, True), (3.0, True), (0.5, False)])
def test_scale_touches_no_memory_when_coefficient_is_at_least_one(coef, survives, tmp_path):
    """The gradients' pages are made inaccessible: any read or write would kill the process."""
    assert mmap.PAGESIZE > 0
    script = tmp_path / "scale.py"
    script.write_text(SCALE_ON_INACCESSIBLE_MEMORY)
    result = subprocess.run(
        [sys.executable, str(script), str(coef)],
        capture_output=True,
        text=True,
        timeout=120,
        env=child_env(),
    )
    assert ("survived" in result.stdout) == survives, result.stderr[-2000:]


def test_compile_fullgraph_aot_eager():
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
    twin = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
    twin.load_state_dict(model.state_dict())
    x = torch.randn(32, 8) * 10

    def clip(params):
        return gradstats.clip_grad_norm_(params, 0.1)

    compiled = torch.compile(clip, backend="aot_eager", fullgraph=True)
    for m in (model, twin):
        m(x).pow(2).sum().backward()
    norm = compiled(list(model.parameters()))
    twin_norm = torch.nn.utils.clip_grad_norm_(twin.parameters(), 0.1)
    assert_close_rel(norm.item(), twin_norm.item(), 1e-5, "compiled norm")
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.allclose(p.grad, q.grad, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("view", ["conj", "neg"])
def test_conjugate_and_negative_views_are_clipped_as_torch_clips_them(device, view):
    """A gradient carrying the conjugate or the negative bit (a lazy view of other memory): the
    same norm and clipped values as torch on the resolved tensor, and the bit kept."""
    dtype = torch.complex64 if view == "conj" else torch.float32
    base = (torch.randn(300, dtype=dtype) * 10).to(device)
    lazy = base.conj() if view == "conj" else base._neg_view()
    resolved = lazy.resolve_conj().resolve_neg().clone()
    ours, theirs = torch.nn.Parameter(torch.zeros_like(resolved)), torch.nn.Parameter(resolved)
    ours.grad, theirs.grad = lazy, resolved.clone()
    norm = gradstats.clip_grad_norm_([ours], 1.0)
    want = torch.nn.utils.clip_grad_norm_([theirs], 1.0)
    torch.testing.assert_close(norm, want, rtol=1e-6, atol=0)
    assert ours.grad.is_conj() == (view == "conj") and ours.grad.is_neg() == (view == "neg")
    torch.testing.assert_close(
        ours.grad.resolve_conj().resolve_neg(), theirs.grad, rtol=1e-6, atol=0
    )
