"""A small statistics-plus-clipping run for compute-sanitizer (benchmarks/gpu_check.sh).

Small on purpose (the sanitizers slow kernels down a hundredfold) but it reaches every kernel
path: all four dtypes in one launch, packs with misaligned heads and odd tails, strided tensors,
empty tensors, tensors of several chunks, NaN/Inf chunks (the exact path), tiny values (the
double re-run), every norm kind, every policy, the scale kernel's skip and zeroing, and a list
long enough for several launches. Every view is sliced on the device, so the kernels see the
misaligned heads and strided walks themselves (a CPU slice moved with .to() would arrive as a fresh,
aligned, contiguous copy). It checks the counts against the CPU kernel, so that a run that the
sanitizer passes also computed the right thing; exits 1 otherwise.

    compute-sanitizer --tool memcheck python benchmarks/sanitize_case.py
    compute-sanitizer --tool memcheck python benchmarks/sanitize_case.py --plant-out-of-bounds

--plant-out-of-bounds is the negative control of benchmarks/gpu_check.sh: it hands the statistics
kernel a tensor that claims more elements than its allocation holds, so memcheck must report an
invalid read in gradstats_stats_kernel. If it does not, the sanitizer's kernel filter matched
nothing and a clean run of the real case would prove nothing.
"""

from __future__ import annotations

import argparse
import math
import sys

import torch

import gradstats
from gradstats import ops

# A kernel chunk holds this many elements (csrc/layout.h: kChunkElems).
CHUNK = 1 << 16
# More tensors than one large launch holds (planner.h: kLargeTensors = 1216).
LONG_LIST = 1300
NORM_TYPES = (2.0, 1.0, math.inf, 3.0)
POLICIES = ("propagate", "skip", "zero")


# Elements the planted tensor claims beyond its allocation (far past any allocation granularity).
PLANTED_OVERRUN = 1 << 20


def make_tensors(device: str) -> list[torch.Tensor]:
    """Views sliced where they live: the kernels must walk their heads, strides and tails."""
    gen = torch.Generator(device=device).manual_seed(0)
    dtypes = (torch.float64, torch.float32, torch.float16, torch.bfloat16)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, device=device)

    out = []
    for i, n in enumerate((0, 1, 3, 8, 9, 17, 4097, CHUNK + 5, 2 * CHUNK + 1)):
        base = randn(n + 7).to(dtypes[i % 4])
        out.append(base[i % 7 : i % 7 + n])  # heads of 0 to 6 elements
    out.append(randn(130, 67).to(torch.bfloat16)[1::2, 3:60])
    out.append(randn(7, 9, 11).to(torch.float16)[::3, 1:, ::2])
    out.append(randn(33, 5).t())
    out.append(randn(3 * CHUNK) * 1e-30)
    poison = torch.tensor([math.nan, math.inf, -math.inf], device=device)
    out[7].view(-1)[[3, 100, CHUNK + 1]] = poison.to(out[7].dtype)
    out[10][0, 0, 0] = math.nan
    return out


class _OversizedView:
    """A CUDA array whose shape claims more elements than its memory holds (__cuda_array_interface__
    lets torch wrap a raw pointer without knowing the allocation's size)."""

    def __init__(self, owner: torch.Tensor, claimed: int) -> None:
        self.owner = owner  # keeps the allocation alive
        self.__cuda_array_interface__ = {
            "shape": (claimed,),
            "typestr": "<f4",
            "data": (owner.data_ptr(), False),
            "version": 3,
        }


def plant_out_of_bounds() -> int:
    """Reads PLANTED_OVERRUN elements past a small allocation: memcheck must flag our kernel."""
    small = torch.ones(CHUNK, device="cuda")
    lying = torch.as_tensor(_OversizedView(small, CHUNK + PLANTED_OVERRUN), device="cuda")
    ops.stats([lying], 2.0, 1.0, "propagate")
    torch.cuda.synchronize()
    print("sanitize_case: planted out-of-bounds read done (memcheck must have reported it)")
    return 0


def check_counts(tensors: list[torch.Tensor], norm_type: float, policy: str) -> bool:
    got = ops.stats(tensors, norm_type, 1.0, policy)[3].cpu()
    want = ops.stats([t.cpu() for t in tensors], norm_type, 1.0, policy)[3]
    if not torch.equal(got, want):
        print(f"counts differ from the CPU kernel's (p={norm_type}, {policy}):\n{got}\n{want}")
        return False
    return True


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--plant-out-of-bounds", action="store_true")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("sanitize_case: no CUDA device")
        return 1
    if args.plant_out_of_bounds:
        return plant_out_of_bounds()
    ok = True
    tensors = make_tensors("cuda")
    for norm_type in NORM_TYPES:
        for policy in POLICIES:
            ok &= check_counts(tensors, norm_type, policy)

    for policy in POLICIES:
        grads = make_tensors("cuda")  # the scale kernel writes through the same views
        params = [torch.nn.Parameter(torch.empty_like(g)) for g in grads]
        for p, g in zip(params, grads):
            p.grad = g
        gradstats.clip_grad_norm_(params, 0.5, on_nonfinite=policy)
        gradstats.clip_grad_norm_(params, 1e30, on_nonfinite=policy)  # nothing to clip: skipped
    writable = make_tensors("cuda")
    for dtype in (torch.float64, torch.float16, torch.bfloat16):
        ops.scale_(writable, torch.tensor(0.5, device="cuda", dtype=dtype))

    whole = torch.randn(LONG_LIST * 51, device="cuda")
    long_list = [whole[i * 51 + i % 3 : i * 51 + i % 3 + 1 + i % 48] for i in range(LONG_LIST)]
    long_list[LONG_LIST - 1][0] = math.inf
    ok &= check_counts(long_list, 2.0, "zero")
    params = [torch.nn.Parameter(torch.empty_like(t)) for t in long_list]
    for p, t in zip(params, long_list):
        p.grad = t
    gradstats.clip_grad_norm_(params, 1.0)
    ops.scale_(long_list, torch.tensor(0.5, device="cuda"))

    # The monitor's per-feature statistics: rows of features, and NCHW channels (an inner stride).
    features = torch.randn(300, 17, device="cuda")
    features[5, 3] = math.nan
    images = torch.randn(4, 3, 9, 11, device="cuda").to(torch.bfloat16)
    for x, dim in ((features, 1), (features[::2], 1), (images, 1)):
        got = ops.feature_stats(x, dim).cpu()
        want = ops.feature_stats(x.cpu(), dim)
        if not torch.allclose(got, want, equal_nan=True):
            print(f"feature_stats differs from the CPU kernel's (dim {dim}, {tuple(x.shape)})")
            ok = False

    torch.cuda.synchronize()
    print("sanitize_case: ok" if ok else "sanitize_case: FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
