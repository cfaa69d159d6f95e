"""Op registration (opcheck, fakes, kernels), build information and every bad input."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
from helpers import DEVICES, child_env
from torch._subclasses.fake_tensor import FakeTensorMode

import gradstats
from gradstats import ops


def sample_tensors(device):
    return [
        torch.randn(100, device=device),
        torch.randn(7, 3, device=device, dtype=torch.float16).t(),
        torch.randn(0, device=device, dtype=torch.bfloat16),
        torch.randn(5, device=device, dtype=torch.float64),
    ]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("policy", ["propagate", "skip", "zero"])
def test_opcheck_stats(device, policy):
    torch.library.opcheck(
        torch.ops.gradstats.stats.default, (sample_tensors(device), 2.0, 1.0, policy)
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("with_counts", [False, True])
def test_opcheck_scale_(device, with_counts):
    tensors = sample_tensors(device)
    counts = torch.tensor([0, 1, 0, 2], device=device) if with_counts else None
    torch.library.opcheck(
        torch.ops.gradstats.scale_.default, (tensors, torch.tensor(0.5, device=device), counts)
    )


def test_fake_stats_describes_the_outputs():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        tensors = [torch.empty(10, dtype=torch.bfloat16), torch.empty(3, 4)]
        total, coef, norms, counts = ops.stats(tensors, 2.0, 1.0, "propagate")
    assert (total.shape, coef.shape, norms.shape, counts.shape) == ((), (), (2,), (3, 3))
    assert norms.dtype == torch.float32 and counts.dtype == torch.int64


def test_every_op_has_a_cpu_kernel_and_a_cuda_kernel_when_built_with_cuda():
    kernels = gradstats.kernel_devices()
    assert set(kernels) == set(ops.OP_NAMES)
    for name, keys in kernels.items():
        assert "CPU" in keys, name
        assert ("CUDA" in keys) == bool(gradstats.BUILD_INFO["cuda"]), (name, keys)


def test_build_info_matches_the_installed_torch():
    assert gradstats.BUILD_INFO["torch"] == torch.__version__
    assert gradstats.BUILD_INFO["cpu_isa"] in ("avx2", "default")


def test_import_refuses_a_build_made_for_another_torch(tmp_path, monkeypatch):
    from gradstats import _build

    info = json.loads(_build.BUILD_INFO_FILE.read_text())
    info["torch"] = "1.0.0+old"
    fake = tmp_path / "_build_info.json"
    fake.write_text(json.dumps(info))
    monkeypatch.setattr(_build, "BUILD_INFO_FILE", fake)
    with pytest.raises(gradstats.BuildError, match=r"built for torch 1\.0\.0\+old.*installed"):
        _build.load_library()


def test_info_command_runs():
    out = subprocess.run(
        [sys.executable, "-m", "gradstats", "info"],
        capture_output=True,
        text=True,
        timeout=120,
        env=child_env(),
    )
    assert out.returncode == 0, out.stderr
    assert torch.__version__ in out.stdout and "stats" in out.stdout


# --- bad inputs: each must raise a clear error and change nothing ---


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.uint8])
def test_integer_tensors_are_rejected(device, dtype):
    bad = torch.ones(4, device=device, dtype=dtype)
    with pytest.raises(RuntimeError, match=r"tensor 1 has dtype .*expected float64, float32"):
        ops.stats([torch.randn(3, device=device), bad], 2.0, 1.0, "propagate")
    with pytest.raises(RuntimeError, match="expected float64"):
        gradstats.get_total_norm([bad])


def test_sparse_tensors_are_rejected():
    sparse = torch.eye(4).to_sparse()
    with pytest.raises(RuntimeError, match=r"layout .*expected dense"):
        ops.stats([sparse], 2.0, 1.0, "propagate")
    p = torch.nn.Parameter(torch.randn(4, 4))
    p.grad = sparse
    with pytest.raises(RuntimeError, match="Sparse gradients are not supported"):
        gradstats.clip_grad_norm_([p], 1.0)


def test_tensors_of_several_devices_in_one_op_call_are_rejected():
    with pytest.raises(RuntimeError, match="tensor 1 is on meta but tensor 0 is on cpu"):
        ops.stats([torch.randn(3), torch.empty(3, device="meta")], 2.0, 1.0, "propagate")


def test_empty_op_call_is_rejected_and_api_returns_zero():
    with pytest.raises(RuntimeError, match="empty list"):
        ops.stats([], 2.0, 1.0, "propagate")
    assert gradstats.get_total_norm([]).item() == 0.0


def first_line(exc: pytest.ExceptionInfo) -> str:
    return str(exc.value).splitlines()[0]


@pytest.mark.parametrize(
    ("key", "call"),
    [
        ("norm_type", lambda fn, x: fn([x], math.nan, 1.0)),
        ("max_norm", lambda fn, x: fn([x], 2.0, -1.0)),
        ("max_norm", lambda fn, x: fn([x], 2.0, math.nan)),
    ],
)
def test_the_op_the_fake_and_the_api_reject_alike(key, call):
    """One table of messages (csrc/checks.cpp): the native op, its fake under FakeTensorMode and
    the Python API raise the same words, which name the argument and the value."""
    x = torch.randn(3)
    with pytest.raises(RuntimeError) as native:
        call(lambda t, p, m: ops.stats(t, p, m, "propagate"), x)
    with FakeTensorMode() as mode, pytest.raises(RuntimeError) as fake:
        call(lambda t, p, m: ops.stats(t, p, m, "propagate"), mode.from_tensor(x))
    with pytest.raises(ValueError) as api:
        call(lambda t, p, m: gradstats.grad_stats(t, norm_type=p, max_norm=m), x)
    assert ops.MESSAGES[key] in first_line(native)
    assert first_line(native) == first_line(fake) == first_line(api)


def test_a_negative_max_norm_never_reaches_the_gradients():
    """The op itself rejects max_norm < 0 (which would flip the gradients' signs)."""
    x = torch.randn(8)
    before = x.clone()
    with pytest.raises(RuntimeError, match="max_norm must be a non-negative number"):
        out = ops.stats([x], 2.0, -1.0, "propagate")
        ops.scale_([x], out[1])
    assert torch.equal(x, before)


def test_norm_type_given_as_text():
    x = torch.randn(5)
    assert gradstats.get_total_norm([x], "inf").item() == x.abs().max().item()
    with pytest.raises(ValueError, match=r"norm_type must be a number.*; got 'fro'"):
        gradstats.get_total_norm([x], "fro")


@pytest.mark.parametrize("max_norm", [-1.0, float("nan")])
def test_bad_max_norm_changes_nothing(max_norm):
    p = torch.nn.Parameter(torch.randn(5))
    p.grad = torch.randn(5)
    before = p.grad.clone()
    with pytest.raises(ValueError, match="max_norm must be a non-negative number"):
        gradstats.clip_grad_norm_([p], max_norm)
    assert torch.equal(p.grad, before)


def test_bad_on_nonfinite():
    p = torch.nn.Parameter(torch.randn(5))
    p.grad = torch.randn(5)
    with pytest.raises(ValueError, match="on_nonfinite must be one of"):
        gradstats.clip_grad_norm_([p], 1.0, on_nonfinite="ignore")
    with pytest.raises(RuntimeError, match="on_nonfinite must be 'propagate', 'skip' or 'zero'"):
        ops.stats([p.grad], 2.0, 1.0, "error")


def test_scale_rejects_bad_coefficients_and_overlapping_memory():
    x = torch.randn(10)
    before = x.clone()
    with pytest.raises(RuntimeError, match="coef must hold one floating-point value"):
        ops.scale_([x], torch.tensor([0.5, 0.5]))
    with pytest.raises(RuntimeError, match="coef must hold one floating-point value"):
        ops.scale_([x], torch.tensor(1))
    with pytest.raises(RuntimeError, match="coef is on meta"):
        ops.scale_([x], torch.tensor(0.5, device="meta"))
    with pytest.raises(RuntimeError, match="share memory"):
        ops.scale_([torch.randn(3, 1).expand(3, 4)], torch.tensor(0.5))
    with pytest.raises(RuntimeError, match=r"zero_nonfinite must be the per-tensor non-finite"):
        ops.scale_([x], torch.tensor(0.5), torch.tensor([1, 2]))
    assert torch.equal(x, before)


def test_a_rejected_tensor_later_in_the_list_leaves_earlier_ones_unscaled():
    good = torch.randn(10)
    before = good.clone()
    with pytest.raises(RuntimeError, match="tensor 1 has dtype"):
        ops.scale_([good, torch.ones(3, dtype=torch.int64)], torch.tensor(0.5))
    assert torch.equal(good, before)


def test_non_tensor_items_get_a_clear_type_error():
    with pytest.raises(TypeError, match="item 1 is a str, expected a tensor or a parameter"):
        gradstats.clip_grad_norm_([torch.nn.Parameter(torch.randn(2)), "w"], 1.0)
    with pytest.raises(TypeError, match="item 0 is a int"):
        gradstats.grad_stats([3])
