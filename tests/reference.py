"""Plain-PyTorch float64 oracle of the gradstats contract, for tests. Not a runtime fallback.

Norms are computed on the scale of the largest finite element (||x|| = m * ||x / m||), so that the
oracle itself does not overflow on the inputs the kernels must get right.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

EPS = 1e-6


@dataclass
class Reference:
    total_norm: float
    norms: list[float]
    nan_counts: list[int]
    inf_counts: list[int]
    clip_coef: float


def _real_flat64(t: Tensor) -> Tensor:
    t = t.detach()
    if t.is_complex():
        t = torch.view_as_real(t.resolve_conj())
    return t.to(torch.float64).reshape(-1).cpu()


def _finite_norm(x: Tensor, p: float) -> float:
    """torch.linalg.vector_norm(x, p) of finite float64 values, computed on the scale of the
    element that dominates (the largest for p > 0, the smallest for p < 0), so that it neither
    overflows nor underflows. An empty x has norm 0 for p > 0 and inf for p < 0 (no element)."""
    if p == 0:
        return float((x != 0).sum())
    a = x.abs()
    if a.numel() == 0:
        return 0.0 if p > 0 else math.inf
    if math.isinf(p):
        return (a.max() if p > 0 else a.min()).item()
    m = (a.max() if p > 0 else a.min()).item()
    if m == 0.0 or math.isinf(m):
        return m
    return m * torch.linalg.vector_norm(a / m, p).item()


def _reported(finite: float, nan: int, inf: int, zero: bool, p: float) -> float:
    """As torch.linalg.vector_norm reports it: the 0 "norm" counts NaN/Inf as nonzero; otherwise a
    NaN makes the norm NaN, and an Inf makes a p > 0 norm Inf (it adds nothing for p < 0)."""
    if zero:
        return finite
    if p == 0:
        return finite + nan + inf
    if nan:
        return math.nan
    if inf and p > 0:
        return math.inf
    return finite


def reference_stats(
    tensors: list[Tensor],
    norm_type: float = 2.0,
    max_norm: float = math.inf,
    on_nonfinite: str = "propagate",
) -> Reference:
    """The contract, element by element: per-tensor norms as torch.linalg.vector_norm computes
    them, the total norm as torch.nn.utils.get_total_norm (the norm of the per-tensor norms), the
    NaN/Inf counts, and the clip coefficient (1 under "skip" when anything is non-finite)."""
    zero = on_nonfinite == "zero"
    finite_norms, nans, infs = [], [], []
    for t in tensors:
        x = _real_flat64(t)
        nans.append(int(torch.isnan(x).sum()))
        infs.append(int(torch.isinf(x).sum()))
        finite_norms.append(_finite_norm(x[torch.isfinite(x)], norm_type))
    norms = [_reported(f, a, b, zero, norm_type) for f, a, b in zip(finite_norms, nans, infs)]
    if norm_type == 0:
        total = float(sum(1 for n in norms if n != 0))
    else:
        finite_total = _finite_norm(torch.tensor(finite_norms, dtype=torch.float64), norm_type)
        total = _reported(finite_total, sum(nans), sum(infs), zero, norm_type)
    if on_nonfinite == "skip" and (sum(nans) + sum(infs) or not math.isfinite(total)):
        coef = 1.0
    else:
        coef = max_norm / (total + EPS)
        coef = coef if math.isnan(coef) else min(1.0, coef)
    return Reference(total, norms, nans, infs, coef)


def reference_clipped(t: Tensor, coef: float, zero_nonfinite: bool = False) -> Tensor:
    """What clipping t by coef should give, computed in float64."""
    x = t.detach().to(torch.complex128 if t.is_complex() else torch.float64).cpu()
    if zero_nonfinite:
        x = torch.view_as_real(x) if x.is_complex() else x
        x = torch.where(torch.isfinite(x), x, torch.zeros_like(x))
        x = torch.view_as_complex(x) if t.is_complex() else x
    return x if coef >= 1.0 else x * coef
