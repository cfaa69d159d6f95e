"""Shared test helpers: the devices to run on and per-dtype tolerances against the oracle."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch
from reference import reference_stats

import gradstats

# Every device test runs on the CPU and, marked "gpu", on CUDA (skipped at run time without one).
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]

# Relative tolerance of a norm against the float64 oracle computed from the same input values.
# The kernels accumulate in float64 (float32 lanes flushed to float64 every few terms), so even
# 16-bit inputs give norms far more accurate than the inputs themselves.
NORM_RTOL = {
    torch.float64: 1e-12,
    torch.float32: 1e-6,
    torch.float16: 1e-6,
    torch.bfloat16: 1e-6,
}

# Relative tolerance of a clipped element against the float64 product (one rounding to the dtype).
CLIP_RTOL = {
    torch.float64: 1e-12,
    torch.float32: 1e-6,
    torch.float16: 1e-3,
    torch.bfloat16: 8e-3,
}

# Relative tolerance of our total norm against torch.nn.utils' own (torch accumulates in the input
# dtype, so its error, not ours, sets these).
TORCH_NORM_RTOL = {
    torch.float64: 1e-10,
    torch.float32: 1e-4,
    torch.float16: 2e-2,
    torch.bfloat16: 2e-2,
}


def assert_close_rel(actual: float, expected: float, rtol: float, what: str = "value") -> None:
    """|actual - expected| <= rtol * |expected|, with NaN == NaN and Inf == Inf of the same sign."""
    if expected != expected:
        assert actual != actual, f"{what}: expected NaN, got {actual}"
        return
    if expected in (float("inf"), float("-inf")):
        assert actual == expected, f"{what}: expected {expected}, got {actual}"
        return
    err = abs(actual - expected)
    assert err <= rtol * abs(expected), (
        f"{what}: {actual!r} vs oracle {expected!r}: relative error "
        f"{err / abs(expected) if expected else err:.3g} > {rtol:g}"
    )


def norm_rtol(tensors: list[torch.Tensor], norm_type: float = 2.0) -> float:
    """Tolerance of a norm against the oracle: the loosest of the inputs' dtypes (pow() per element
    for a general p in float64 adds its own rounding)."""
    rtol = max(NORM_RTOL[t.real.dtype if t.is_complex() else t.dtype] for t in tensors)
    return rtol if norm_type in (1.0, 2.0, math.inf) else max(rtol, 1e-9)


def assert_stats_match_oracle(tensors, out, norm_type=2.0, max_norm=1.0, policy="propagate"):
    """The outputs of the stats op on these tensors against the float64 oracle: norms within the
    dtype tolerance, counts exact."""
    total, coef, norms, counts = out
    ref = reference_stats([t.cpu() for t in tensors], norm_type, max_norm, policy)
    rtol = norm_rtol(tensors, norm_type)
    assert_close_rel(total.item(), ref.total_norm, rtol, "total norm")
    assert_close_rel(coef.item(), ref.clip_coef, max(rtol, 1e-6), "clip coefficient")
    for i, (got, want) in enumerate(zip(norms.tolist(), ref.norms)):
        assert_close_rel(got, want, rtol, f"norm of tensor {i}")
    counts = counts.cpu()
    nonfinite = [a + b for a, b in zip(ref.nan_counts, ref.inf_counts)]
    assert counts[0, :-1].tolist() == ref.nan_counts
    assert counts[1, :-1].tolist() == ref.inf_counts
    assert counts[2, :-1].tolist() == nonfinite
    assert counts[:, -1].tolist() == [sum(ref.nan_counts), sum(ref.inf_counts), sum(nonfinite)]


def child_env() -> dict[str, str]:
    """The environment for a child Python process that must import the same gradstats as these
    tests (an in-place build, a wheel in a virtual environment, an editable install alike)."""
    here = str(Path(gradstats.__file__).resolve().parent.parent)
    path = os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path}


def equal_bitwise(a, b) -> bool:
    """The same nested state (tensors, dicts, lists, tuples, plain values), tensors bit for bit."""
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(equal_bitwise(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(equal_bitwise(x, y) for x, y in zip(a, b))
    return a == b


def twin(params: list[torch.nn.Parameter]) -> list[torch.nn.Parameter]:
    """Independent copies of parameters and their gradients (to run the functional call on)."""
    out = []
    for p in params:
        q = torch.nn.Parameter(p.detach().clone())
        q.grad = None if p.grad is None else p.grad.clone()
        out.append(q)
    return out
