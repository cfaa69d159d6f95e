"""CUDA-specific behaviour of the fused kernels.

The device-independent contract (norms, counts, policies, dtypes, shapes) is tested by the general
suite over helpers.DEVICES, cuda included; this file covers what only the CUDA path has: one launch
for mixed dtypes, launch splits of long lists, int64 indexing, bitwise determinism, CUDA graphs,
no synchronisation, the scale kernel's skip, several GPUs. Every test but the first is marked gpu
and skipped at run time without a CUDA device (conftest.py); nothing queries CUDA at import time.
"""

from __future__ import annotations

import math

import pytest
import torch
from helpers import CLIP_RTOL, NORM_RTOL, assert_close_rel, assert_stats_match_oracle
from reference import reference_clipped, reference_stats

import gradstats
from gradstats import ops

gpu = pytest.mark.gpu

# A kernel chunk holds this many elements (csrc/cuda/planner.h: kChunkElems).
CHUNK = 1 << 16
# Tensors one small launch holds (planner.h: kSmallTensors), and one large launch (kLargeTensors).
SMALL_LAUNCH = 128
LARGE_LAUNCH = 1216
# A bfloat16 tensor this long needs int64 element indices.
HUGE_NUMEL = 2**31 + 5
# Free GPU memory the huge-tensor test needs: the tensor (2 bytes an element) and headroom.
HUGE_FREE_BYTES = 3 * 2 * HUGE_NUMEL
POLICIES = ("propagate", "skip", "zero")


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits of a tensor, for bitwise comparisons (NaN == NaN)."""
    itemsize_dtype = {8: torch.int64, 4: torch.int32, 2: torch.int16}[t.element_size()]
    return t.detach().contiguous().view(itemsize_dtype).cpu()


def _assert_bitwise(a: tuple, b: tuple, what: str) -> None:
    for x, y in zip(a, b):
        assert torch.equal(_bits(x), _bits(y)), f"{what}: outputs differ bitwise"


def _assert_same_values(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    """Equal values, NaN matching NaN whatever its payload (the CPU's vectorised float-to-bfloat16
    conversion writes another NaN than the scalar one)."""
    torch.testing.assert_close(a.cpu(), b.cpu(), rtol=0, atol=0, equal_nan=True, msg=what)


def _mixed_tensors(device: str = "cuda", with_float64: bool = False) -> list[torch.Tensor]:
    """Every dtype, sizes around the chunk and pack boundaries, misaligned and strided views."""
    dtypes = [torch.float32, torch.float16, torch.bfloat16]
    dtypes += [torch.float64] if with_float64 else []
    out = []
    for i, n in enumerate([0, 1, 7, 9, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK + 13]):
        dtype = dtypes[i % len(dtypes)]
        base = torch.randn(n + 3, device=device).to(dtype)
        out.append(base[i % 3 : i % 3 + n])  # offsets of 0 to 2 elements: misaligned packs
    out.append(torch.randn(300, 70, device=device).to(torch.bfloat16)[:, 3:50])  # column slice
    out.append(torch.randn(64, 33, device=device).t())  # permuted dense: flat
    out.append(torch.randn(9, 10, 11, device=device).to(torch.float16)[::2, :, 1::3])
    out.append(torch.randn(5, 1, device=device).expand(5, 1000))  # stride 0
    out.append(torch.randn(100, 3, dtype=torch.complex64, device=device))
    return out


def _kernel_names(fn) -> list[str]:
    """Names of the CUDA kernels fn launches (CUPTI through torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    names = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    return [n for n in names if not n.startswith(("Memset", "Memcpy"))]


# --- runs everywhere --------------------------------------------------------------------------


def test_cuda_kernels_registered_exactly_when_built_with_cuda():
    built = bool(gradstats.BUILD_INFO["cuda"])
    devices = gradstats.kernel_devices()
    assert set(devices) == set(ops.OP_NAMES)
    for op, keys in devices.items():
        assert "CPU" in keys, f"gradstats::{op} has no CPU kernel"
        assert ("CUDA" in keys) == built, (
            f"gradstats::{op}: CUDA kernel registered: {'CUDA' in keys}, build has CUDA: {built}"
        )


# --- one launch, every dtype ------------------------------------------------------------------


@gpu
@pytest.mark.parametrize("with_float64", [False, True])
def test_mixed_dtypes_match_cpu_and_oracle(with_float64):
    tensors = _mixed_tensors(with_float64=with_float64)
    tensors[3].view(-1)[5] = float("nan")
    tensors[6].view(-1)[-1] = float("inf")
    for policy in POLICIES:
        out = ops.stats(tensors, 2.0, 1.0, policy)
        assert out[0].device.type == "cuda"
        assert out[0].dtype == (torch.float64 if with_float64 else torch.float32)
        assert_stats_match_oracle(tensors, out, policy=policy)
        cpu = ops.stats([t.cpu() for t in tensors], 2.0, 1.0, policy)
        assert torch.equal(out[3].cpu(), cpu[3]), "counts differ from the CPU kernel's"


@gpu
def test_one_stats_launch_and_one_scale_launch_for_mixed_dtypes():
    tensors = _mixed_tensors(with_float64=True)[:-2]  # no expanded view: scale_ writes
    params = [torch.nn.Parameter(torch.empty_like(t)) for t in tensors]
    for p, t in zip(params, tensors):
        p.grad = t.clone() * 100.0  # large enough to clip
    names = _kernel_names(lambda: gradstats.clip_grad_norm_(params, 1.0))
    if not names:
        pytest.skip("the profiler recorded no CUDA kernels (CUPTI unavailable)")
    ours = [n for n in names if "gradstats" in n]
    assert len([n for n in ours if "stats_kernel" in n]) == 1, names
    assert len([n for n in ours if "scale_kernel" in n]) == 1, names
    assert len(names) == 2, f"stats + clip launched other kernels too: {names}"


@gpu
@pytest.mark.parametrize("norm_type", [1.0, 2.0, math.inf, 3.0, 0.5])
def test_norm_types(norm_type):
    tensors = _mixed_tensors()
    out = ops.stats(tensors, norm_type, 0.5, "propagate")
    assert_stats_match_oracle(tensors, out, norm_type, 0.5)


# --- numerics: overflow, underflow, non-finite chunks -----------------------------------------


@gpu
def test_no_spurious_overflow_and_clipping_not_zeroing():
    big32 = torch.full((CHUNK + 5,), 1e20, device="cuda")  # squares overflow float lanes
    big16 = torch.full((1000,), 60000.0, device="cuda", dtype=torch.float16)  # norm > 65504
    big64 = torch.full((3,), 1e200, device="cuda", dtype=torch.float64)  # squares overflow double
    for tensors in ([big32, big16], [big64, big16.double()]):
        out = ops.stats(tensors, 2.0, 1.0, "propagate")
        assert_stats_match_oracle(tensors, out)
        assert math.isfinite(out[0].item())
    for g in (big32, big16):
        param = torch.nn.Parameter(torch.empty_like(g))
        param.grad = g.clone()
        total = gradstats.clip_grad_norm_([param], 1.0)
        coef = 1.0 / (total.item() + 1e-6)
        assert (param.grad != 0).all(), "clipped to zero"
        torch.testing.assert_close(
            param.grad.double().cpu(), reference_clipped(g, coef), rtol=CLIP_RTOL[g.dtype], atol=0
        )


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tiny_values_do_not_underflow(dtype):
    tiny = (torch.rand(2 * CHUNK + 3, device="cuda") * 1e-30).to(dtype)
    zeros = torch.zeros(CHUNK, device="cuda", dtype=dtype)
    tensors = [tiny, zeros]
    assert_stats_match_oracle(tensors, ops.stats(tensors, 2.0, 1.0, "propagate"))


@gpu
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_nonfinite_chunks_counted_exactly(dtype):
    x = torch.randn(4 * CHUNK + 17, device="cuda").to(dtype)
    idx = torch.randperm(x.numel(), device="cuda")[:301]
    x[idx[:100]] = float("nan")
    x[idx[100:200]] = float("inf")
    x[idx[200:]] = float("-inf")
    y = torch.randn(CHUNK, device="cuda").to(dtype)
    for policy in POLICIES:
        for p in (2.0, 1.0, math.inf):
            assert_stats_match_oracle([x, y], ops.stats([x, y], p, 1.0, policy), p, 1.0, policy)


# --- long lists, launch splits, determinism ---------------------------------------------------


def _many_tensors(n: int) -> list[torch.Tensor]:
    gen = torch.Generator(device="cuda").manual_seed(n)
    dtypes = [torch.float32, torch.bfloat16, torch.float16]
    sizes = torch.randint(0, 3000, (n,), generator=gen, device="cuda").tolist()
    out = [
        torch.randn(s, generator=gen, device="cuda").to(dtypes[i % 3]) for i, s in enumerate(sizes)
    ]
    out[n // 2] = torch.randn(3 * CHUNK + 1, generator=gen, device="cuda")
    return out


# GPU against CPU kernel: each is within NORM_RTOL (1e-6) of the float64 oracle.
GPU_VS_CPU_RTOL = 2e-6


@gpu
@pytest.mark.parametrize("n", [SMALL_LAUNCH, SMALL_LAUNCH + 1, LARGE_LAUNCH + 1, 10_000])
def test_long_lists_match_cpu(n):
    tensors = _many_tensors(n)
    tensors[n // 2].view(-1)[:1] = float("nan")
    next(t for t in reversed(tensors) if t.numel() > 1).view(-1)[:2] = float("inf")
    for policy in ("propagate", "zero"):
        out = ops.stats(tensors, 2.0, 1.0, policy)
        cpu = ops.stats([t.cpu() for t in tensors], 2.0, 1.0, policy)
        assert torch.equal(out[3].cpu(), cpu[3]), "counts differ from the CPU kernel's"
        assert out[3][:, -1].tolist() == [1, 2, 3]
        torch.testing.assert_close(
            out[2].cpu(), cpu[2], rtol=GPU_VS_CPU_RTOL, atol=0, equal_nan=True
        )
        assert_close_rel(out[0].item(), cpu[0].item(), GPU_VS_CPU_RTOL, "total norm")
        assert_close_rel(out[1].item(), cpu[1].item(), GPU_VS_CPU_RTOL, "clip coefficient")


@gpu
def test_only_empty_tensors():
    tensors = [torch.empty(0, device="cuda"), torch.empty(3, 0, device="cuda", dtype=torch.half)]
    total, coef, norms, counts = ops.stats(tensors, 2.0, 1.0, "propagate")
    assert total.item() == 0.0 and coef.item() == 1.0
    assert norms.tolist() == [0.0, 0.0] and counts.abs().sum().item() == 0
    ops.scale_(tensors, torch.tensor(0.5, device="cuda"))


@gpu
@pytest.mark.parametrize(
    ("dtype", "norm_type", "policy"),
    [
        (torch.int32, 2.0, "propagate"),
        (torch.float32, 0.0, "propagate"),
        (torch.float32, 2.0, "no"),
    ],
)
def test_same_errors_as_cpu(dtype, norm_type, policy):
    messages = []
    for device in ("cpu", "cuda"):
        with pytest.raises(RuntimeError) as err:
            ops.stats([torch.ones(3, dtype=dtype, device=device)], norm_type, 1.0, policy)
        messages.append(str(err.value).splitlines()[0])
    assert messages[0] == messages[1]


# --- int64 indexing ---------------------------------------------------------------------------


@gpu
def test_bfloat16_tensor_past_2_31_elements():
    free, _ = torch.cuda.mem_get_info()
    if free < HUGE_FREE_BYTES:
        pytest.skip(f"needs {HUGE_FREE_BYTES / 2**30:.1f} GiB of free GPU memory")
    x = torch.ones(HUGE_NUMEL, device="cuda", dtype=torch.bfloat16)
    x[2**31] = float("nan")
    x[2**31 + 1] = float("inf")
    x[-2:] = 2.0
    total, _, _, counts = ops.stats([x], 2.0, 1.0, "zero")
    expected = math.sqrt((HUGE_NUMEL - 4) + 2 * 2.0**2)
    assert_close_rel(total.item(), expected, NORM_RTOL[torch.bfloat16], "norm past 2^31")
    assert counts[:, 0].tolist() == [1, 1, 2]
    ops.scale_([x], torch.tensor(0.5, device="cuda"), counts[2, :-1])
    assert x[0].item() == 0.5 and x[2**31 - 1].item() == 0.5
    assert x[2**31].item() == 0.0 and x[2**31 + 1].item() == 0.0, "non-finite not zeroed"
    assert x[2**31 + 2].item() == 0.5 and x[-1].item() == 1.0, "elements past 2^31 not scaled"
    del x


# --- the scale kernel -------------------------------------------------------------------------


def _disjoint_views(t: torch.Tensor) -> list[torch.Tensor]:
    """A misaligned flat chunk, a strided slice and a misaligned tail of t, sharing no element."""
    rows = t[CHUNK + 1 : CHUNK + 1 + 100 * 512].view(100, 512)
    return [t[1 : CHUNK + 1], rows[:, 3:500], t[CHUNK + 1 + 100 * 512 + 3 :]]


@gpu
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_scale_matches_cpu(dtype):
    """The same products in the same opmath as the CPU kernel: equal values, element for element."""
    x = torch.randn(3 * CHUNK + 11, device="cuda").to(dtype)
    x[7] = float("nan")
    x[CHUNK + 1 + 3] = float("inf")
    for coef in (0.3, 1.0, 2.0, float("nan")):
        for zero in (None, torch.tensor([1, 1, 0])):
            gpu_t, cpu_t = x.clone(), x.cpu()
            c = torch.tensor(coef)
            ops.scale_(_disjoint_views(gpu_t), c.cuda(), None if zero is None else zero.cuda())
            ops.scale_(_disjoint_views(cpu_t), c, zero)
            _assert_same_values(gpu_t, cpu_t, f"coef {coef}, zero {zero}")


@gpu
def test_scale_skips_when_coef_at_least_one():
    x = torch.randn(CHUNK + 3, device="cuda")
    x[2] = float("nan")
    before = _bits(x)
    for coef in (1.0, 1.5, float("inf")):
        ops.scale_([x], torch.tensor(coef, device="cuda"))
        assert torch.equal(_bits(x), before)
    ops.scale_([x], torch.tensor(float("nan"), device="cuda"))
    assert torch.isnan(x).all(), "a NaN coefficient multiplies, as torch does"


@gpu
def test_scale_reads_coef_of_any_float_dtype_on_device():
    for dtype in (torch.float64, torch.float32, torch.float16, torch.bfloat16):
        x = torch.full((100,), 2.0, device="cuda")
        ops.scale_([x], torch.tensor(0.5, device="cuda", dtype=dtype))
        assert (x == 1.0).all(), dtype


@gpu
def test_strided_scale_leaves_the_rest_untouched():
    base = torch.randn(400, 300, device="cuda", dtype=torch.bfloat16)
    view = base[::3, 5:290:2]
    expected = base.clone()
    expected[::3, 5:290:2] = (expected[::3, 5:290:2].float() * 0.25).to(torch.bfloat16)
    ops.scale_([view], torch.tensor(0.25, device="cuda"))
    assert torch.equal(base, expected)


# --- CUDA graphs and synchronisation ----------------------------------------------------------


def _params_with_grads(n: int, device: str = "cuda") -> list[torch.nn.Parameter]:
    dtypes = [torch.float32, torch.bfloat16, torch.float16]
    params = []
    for i in range(n):
        size = 2 * CHUNK + 1 if i == 0 else 17 + 1000 * (i % 5)
        p = torch.nn.Parameter(torch.empty(size, device=device, dtype=dtypes[i % 3]))
        p.grad = torch.randn_like(p)
        params.append(p)
    return params


def _copies(params: list[torch.nn.Parameter]) -> list[torch.nn.Parameter]:
    out = []
    for p in params:
        q = torch.nn.Parameter(p.detach().clone())
        q.grad = p.grad.clone()
        out.append(q)
    return out


@gpu
@pytest.mark.parametrize("n", [6, SMALL_LAUNCH + 50, LARGE_LAUNCH + 10])  # 1, 1 and 2 launches
def test_cuda_graph_capture_and_replay_of_clip_grad_norm(n):
    params = _params_with_grads(n)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the graph, on copies of the gradients
        gradstats.clip_grad_norm_(_copies(params), 1.0)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        total = gradstats.clip_grad_norm_(params, 1.0)
    for scale in (10.0, 1e-4, 3.0):  # clips, does not clip, clips
        new = [torch.randn_like(p) * scale for p in params]
        for p, g in zip(params, new):
            p.grad.copy_(g)
        graph.replay()
        torch.cuda.synchronize()
        ref = reference_stats([g.cpu() for g in new], 2.0, 1.0)
        assert_close_rel(total.item(), ref.total_norm, NORM_RTOL[torch.float16], "replayed norm")
        for p, g in zip(params, new):
            want = reference_clipped(g, ref.clip_coef)
            torch.testing.assert_close(
                p.grad.double().cpu(), want, rtol=CLIP_RTOL[g.dtype], atol=1e-30
            )
            if ref.clip_coef >= 1.0:
                assert torch.equal(p.grad, g), "nothing to clip, yet the gradient changed"


@gpu
def test_default_paths_do_not_synchronise():
    params = _params_with_grads(8)
    params[1].grad[0] = float("nan")
    grads = [p.grad for p in params]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        gradstats.grad_stats(params, max_norm=1.0)
        gradstats.get_total_norm(grads)
        for policy in POLICIES:
            gradstats.clip_grad_norm_(params, 1.0, on_nonfinite=policy)
        total = gradstats.get_total_norm(grads)
        gradstats.clip_grads_with_norm_(params, 1.0, total)
        ops.scale_(grads, torch.ones((), device="cuda"))
    finally:
        torch.cuda.set_sync_debug_mode("default")


# --- several GPUs -----------------------------------------------------------------------------


@gpu
@pytest.mark.multi_gpu
def test_two_gpus():
    on0 = [torch.randn(CHUNK + 9, device="cuda:0"), torch.randn(33, device="cuda:0").half()]
    on1 = [torch.randn(2 * CHUNK, device="cuda:1").bfloat16(), torch.randn(7, device="cuda:1")]
    on1[1][3] = float("inf")
    with torch.cuda.device(0):  # the op guards the tensors' device, not the current one
        out1 = ops.stats(on1, 2.0, 1.0, "zero")
    assert out1[0].device == torch.device("cuda:1")
    assert_stats_match_oracle(on1, out1, policy="zero")

    tensors = on0 + on1
    st = gradstats.grad_stats(tensors, max_norm=1.0)
    ref = reference_stats([t.cpu() for t in tensors], 2.0, 1.0)
    assert st.total_norm.item() == float("inf") and ref.total_norm == float("inf")
    assert st.counts[1, :-1].tolist() == ref.inf_counts

    params = [torch.nn.Parameter(torch.empty_like(t)) for t in tensors]
    for p, t in zip(params, tensors):
        p.grad = t.clone()
    params[3].grad[3] = 0.0
    finite = [p.grad.clone() for p in params]
    total = gradstats.clip_grad_norm_(params, 1.0)
    ref = reference_stats([g.cpu() for g in finite], 2.0, 1.0)
    assert_close_rel(total.item(), ref.total_norm, NORM_RTOL[torch.bfloat16], "two-GPU norm")
    for p, g in zip(params, finite):
        want = reference_clipped(g, ref.clip_coef)
        torch.testing.assert_close(p.grad.double().cpu(), want, rtol=CLIP_RTOL[g.dtype], atol=0)


@pytest.mark.multi_gpu
@pytest.mark.parametrize("policy", ["propagate", "zero", "skip"])
def test_a_list_over_two_gpus_never_waits_for_the_host(policy):
    """Interleaved devices (several runs per device): combining the devices' statistics and
    zeroing per device move data without index tensors, so nothing synchronises."""
    tensors = [torch.randn(1000 + i, device=f"cuda:{i % 2}") for i in range(6)]
    tensors[3][5] = float("nan")
    params = [torch.nn.Parameter(torch.empty_like(t)) for t in tensors]
    for p, t in zip(params, tensors):
        p.grad = t.clone()
    expected = reference_stats([t.cpu() for t in tensors], 2.0, 1.0, policy)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        st = gradstats.grad_stats(tensors, max_norm=1.0)
        gradstats.clip_grad_norm_(params, 1.0, on_nonfinite=policy)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert st.counts[0, :-1].tolist() == expected.nan_counts
    assert_close_rel(st.norms[2].item(), expected.norms[2], NORM_RTOL[torch.float32], "norm 2")
    if policy == "zero":
        assert torch.isfinite(params[3].grad).all()


@pytest.mark.gpu
@pytest.mark.parametrize("first", ["cuda", "cpu"])
def test_a_list_of_cpu_and_cuda_gradients_is_clipped_by_the_right_coefficient(first):
    """The coefficient computed on the first device reaches the CPU's scale already landed (a
    non-blocking copy into pinned memory would hand it 0, or a previous step's value)."""
    for attempt in range(3):  # a stale pinned buffer: several steps with different coefficients
        scale = 10.0 ** (attempt + 1)
        grads = {d: torch.randn(4096, device=d) * scale for d in ("cuda", "cpu")}
        order = [first, "cpu" if first == "cuda" else "cuda"]
        params = [torch.nn.Parameter(torch.empty_like(grads[d])) for d in order]
        for p, d in zip(params, order):
            p.grad = grads[d].clone()
        expected = reference_stats([grads[d].cpu() for d in order], 2.0, 1.0)
        gradstats.clip_grad_norm_(params, 1.0)
        for p, d in zip(params, order):
            want = reference_clipped(grads[d].cpu(), expected.clip_coef)
            torch.testing.assert_close(
                p.grad.double().cpu(), want, rtol=CLIP_RTOL[torch.float32], atol=0
            )
