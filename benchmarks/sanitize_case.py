"""A small statistics-plus-clipping run for compute-sanitizer (benchmarks/gpu_check.sh).

Small on purpose (the sanitizers slow kernels down a hundredfold) but it reaches every kernel
path: all four dtypes in one launch, packs with misaligned heads and odd tails, strided tensors,
empty tensors, tensors of several chunks, NaN/Inf chunks (the exact path), tiny values (the
double re-run), every norm kind, every policy, the scale kernel's skip and zeroing, and a list
long enough for several launches. It checks the counts against the CPU kernel, so that a run
that the sanitizer passes also computed the right thing; exits 1 otherwise.

    compute-sanitizer --tool memcheck python benchmarks/sanitize_case.py
"""

from __future__ import annotations

import math
import sys

import torch

import gradstats
from gradstats import ops

# A kernel chunk holds this many elements (csrc/cuda/planner.h: kChunkElems).
CHUNK = 1 << 16
# More tensors than one large launch holds (planner.h: kLargeTensors = 1216).
LONG_LIST = 1300
NORM_TYPES = (2.0, 1.0, math.inf, 3.0)
POLICIES = ("propagate", "skip", "zero")


def make_tensors(device: str) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    dtypes = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
    out = []
    for i, n in enumerate((0, 1, 3, 8, 9, 17, 4097, CHUNK + 5, 2 * CHUNK + 1)):
        base = torch.randn(n + 7, generator=gen).to(dtypes[i % 4])
        out.append(base[i % 7 : i % 7 + n])  # heads of 0 to 6 elements
    out.append(torch.randn(130, 67, generator=gen).to(torch.bfloat16)[1::2, 3:60])
    out.append(torch.randn(7, 9, 11, generator=gen).to(torch.float16)[::3, 1:, ::2])
    out.append(torch.randn(33, 5, generator=gen).t())
    out.append(torch.randn(3 * CHUNK, generator=gen) * 1e-30)
    out[7].view(-1)[[3, 100, CHUNK + 1]] = torch.tensor([math.nan, math.inf, -math.inf]).to(
        out[7].dtype
    )
    out[10][0, 0, 0] = math.nan
    return [t.to(device) for t in out]


def check_counts(tensors: list[torch.Tensor], norm_type: float, policy: str) -> bool:
    got = ops.stats(tensors, norm_type, 1.0, policy)[3].cpu()
    want = ops.stats([t.cpu() for t in tensors], norm_type, 1.0, policy)[3]
    if not torch.equal(got, want):
        print(f"counts differ from the CPU kernel's (p={norm_type}, {policy}):\n{got}\n{want}")
        return False
    return True


def main() -> int:
    if not torch.cuda.is_available():
        print("sanitize_case: no CUDA device")
        return 1
    ok = True
    tensors = make_tensors("cuda")
    for norm_type in NORM_TYPES:
        for policy in POLICIES:
            ok &= check_counts(tensors, norm_type, policy)

    writable = [t.clone() for t in tensors]
    for policy in POLICIES:
        params = [torch.nn.Parameter(torch.empty_like(t)) for t in writable]
        for p, t in zip(params, writable):
            p.grad = t.clone()
        gradstats.clip_grad_norm_(params, 0.5, on_nonfinite=policy)
        gradstats.clip_grad_norm_(params, 1e30, on_nonfinite=policy)  # nothing to clip: skipped
    for dtype in (torch.float64, torch.float16, torch.bfloat16):
        ops.scale_(writable, torch.tensor(0.5, device="cuda", dtype=dtype))

    long_list = [torch.randn(1 + i % 50, device="cuda") for i in range(LONG_LIST)]
    long_list[LONG_LIST - 1][0] = math.inf
    ok &= check_counts(long_list, 2.0, "zero")
    params = [torch.nn.Parameter(torch.empty_like(t)) for t in long_list]
    for p, t in zip(params, long_list):
        p.grad = t
    gradstats.clip_grad_norm_(params, 1.0)
    ops.scale_(long_list, torch.tensor(0.5, device="cuda"))

    torch.cuda.synchronize()
    print("sanitize_case: ok" if ok else "sanitize_case: FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
