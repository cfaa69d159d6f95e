"""The feature_stats op: per-feature statistics of one input against numpy, every dtype and layout,
deterministic for any thread count, its argument checks, and torch.library.opcheck."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import DEVICES, DTYPES

from gradstats import ops

NAN, INF = float("nan"), float("inf")
# The op accumulates in float64 from the input's own values: only the summation order differs.
SUM_RTOL = 1e-12
# Elements in one piece of the kernels (csrc/feature_stats.h kFeaturePieceElems).
PIECE_ELEMS = 1 << 16


def expected(x: torch.Tensor, dim: int) -> np.ndarray:
    """The same statistics from numpy, in float64, from the very values the op reads."""
    values = np.moveaxis(x.detach().cpu().double().numpy(), dim, -1)
    values = values.reshape(-1, values.shape[-1])
    finite = np.isfinite(values)
    kept = np.where(finite, values, 0.0)
    with np.errstate(invalid="ignore"):
        low = np.where(finite, values, np.inf).min(axis=0, initial=np.inf)
        high = np.where(finite, values, -np.inf).max(axis=0, initial=-np.inf)
    return np.stack(
        [
            finite.sum(axis=0),
            kept.sum(axis=0),
            (kept * kept).sum(axis=0),
            np.isnan(values).sum(axis=0),
            np.isinf(values).sum(axis=0),
            -low,
            high,
        ]
    ).astype(np.float64)


def assert_matches(x: torch.Tensor, dim: int) -> None:
    got = ops.feature_stats(x, dim).cpu().numpy()
    want = expected(x, dim)
    assert got.shape == (len(ops.FEATURE_ROWS), x.shape[dim])
    exact = [0, 3, 4, 5, 6]  # counts and extremes are exact
    np.testing.assert_array_equal(got[exact], want[exact])
    np.testing.assert_allclose(got[1:3], want[1:3], rtol=SUM_RTOL, atol=1e-300)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("shape", "dim"),
    [((64, 5), -1), ((64, 5), 0), ((8, 12, 6), -1), ((4, 3, 9, 7), 1), ((7,), 0), ((0, 4), 1)],
)
def test_matches_numpy(device, dtype, shape, dim):
    x = (torch.randn(shape, dtype=torch.float64) * 100).to(dtype).to(device)
    if x.numel() > 4:
        flat = x.view(-1)
        flat[1], flat[3], flat[-1] = NAN, INF, -INF
    assert_matches(x, dim)


@pytest.mark.parametrize("device", DEVICES)
def test_many_pieces_non_contiguous_and_all_nonfinite(device):
    x = torch.randn(3 * PIECE_ELEMS // 4 + 5, 4, device=device) * 1e3
    x[:, 2] = NAN  # a feature with no finite value: extremes -inf
    assert_matches(x, 1)
    assert_matches(x.t(), 0)  # non-contiguous: read through a contiguous copy
    assert_matches(torch.randn(6, 5, 4, device=device).permute(2, 0, 1), 2)
    got = ops.feature_stats(x, 1).cpu()
    assert got[ops.FEATURE_ROWS.index("max"), 2] == -INF
    assert got[ops.FEATURE_ROWS.index("nan"), 2] == x.shape[0]


def test_comparison_can_fail():
    x = torch.randn(16, 3)
    out = ops.feature_stats(x, 1).numpy()
    out_wrong = expected(x, 1).copy()
    out_wrong[2, 1] *= 1 + 1e-9
    with pytest.raises(AssertionError):
        np.testing.assert_allclose(out[1:3], out_wrong[1:3], rtol=SUM_RTOL)


def test_bitwise_the_same_for_any_thread_count():
    x = torch.randn(5 * PIECE_ELEMS // 3, 3) * 7
    saved = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            results.append(ops.feature_stats(x, 1))
    finally:
        torch.set_num_threads(saved)
    assert all(torch.equal(results[0], r) for r in results[1:])


@pytest.mark.parametrize(
    ("make", "dim", "message"),
    [
        (lambda: torch.tensor(1.0), 0, "0-dim"),
        (lambda: torch.ones(2, 3), 2, "dim 2 is out of range"),
        (lambda: torch.ones(2, 3), -3, "dim -3 is out of range"),
        (lambda: torch.ones(2, 3, dtype=torch.int64), 1, "dtype Long"),
        (lambda: torch.ones(2, 0), 1, "is empty"),
        (lambda: torch.ones(2, 3).to_sparse(), 1, "layout Sparse"),
    ],
)
def test_rejects_bad_arguments(make, dim, message):
    with pytest.raises(RuntimeError, match=message):
        ops.feature_stats(make(), dim)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    for x, dim in ((torch.randn(8, 3), 1), (torch.randn(2, 3, 4, 4).half(), 1)):
        torch.library.opcheck(torch.ops.gradstats.feature_stats.default, (x.to(device), dim))


def test_registered_for_cpu_and_cuda():
    assert "CPU" in ops.kernel_devices()["feature_stats"]
    if ops.BUILD_INFO.get("cuda"):
        assert "CUDA" in ops.kernel_devices()["feature_stats"]
