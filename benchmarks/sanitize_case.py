"""A small statistics-plus-clipping run for compute-sanitizer (benchmarks/gpu_check.sh).

Small on purpose (the sanitizers slow kernels down a hundredfold) but it reaches every kernel
path: all four dtypes in one launch, packs with misaligned heads and odd tails, strided tensors,
empty tensors, tensors of several chunks, NaN/Inf chunks (the exact path), tiny values (the
double re-run), every norm kind (2, 1, inf, a general p, 0, negative orders, -inf), every policy,
the scale kernel's skip and zeroing, a list long enough for several launches, GradPlan (planned,
reused, re-planned after a gradient changes layout), feature_stats of one piece and of several
(the combine kernel), and a list of CPU and CUDA gradients. Every view is sliced on the device, so
the kernels see the misaligned heads and strided walks themselves (a CPU slice moved with .to()
would arrive as a fresh, aligned, contiguous copy). Every input is filled on the host and copied
to the device (cudaMemcpy): the sanitizers instrument only our kernels (--kernel-name), so memory
that one of torch's kernels wrote looks uninitialised to initcheck. Under initcheck
(GRADSTATS_SANITIZER=initcheck) the cases whose inputs only a torch kernel can write (a
non-contiguous feature_stats input, copied by torch; the mixed-device list, whose coefficient
torch combines) are left out, and said so. It checks counts, norms and clipped values against
the CPU kernel, so that a run that the sanitizer passes also computed the right thing; exits 1
otherwise.

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
import os
import sys
from collections.abc import Callable

import torch

import gradstats
from gradstats import ops

# A kernel chunk holds this many elements (csrc/layout.h: kChunkElems).
CHUNK = 1 << 16
# More tensors than one large launch holds (planner.h: kLargeTensors = 1216).
LONG_LIST = 1300
NORM_TYPES = (2.0, 1.0, math.inf, 3.0, 0.0, -1.0, -math.inf)
POLICIES = ("propagate", "skip", "zero")
# GPU against CPU kernel: the same float64 sums in another order, rounded to the output dtype.
RTOL = 1e-5
# Elements the planted tensor claims beyond its allocation (far past any allocation granularity).
PLANTED_OVERRUN = 1 << 20
# Set by benchmarks/gpu_check.sh for the initcheck run.
UNDER_INITCHECK = os.environ.get("GRADSTATS_SANITIZER") == "initcheck"
DEVICE = "cuda"


def on_device(host: torch.Tensor) -> torch.Tensor:
    """A CUDA copy of a host tensor, written by cudaMemcpy (initcheck sees it), not a kernel."""
    return host.contiguous().to(DEVICE)


def make_tensors() -> list[torch.Tensor]:
    """Views sliced where they live: the kernels must walk their heads, strides and tails."""
    gen = torch.Generator().manual_seed(0)
    dtypes = (torch.float64, torch.float32, torch.float16, torch.bfloat16)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen)

    bases: list[tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]] = []
    for i, n in enumerate((0, 1, 3, 8, 9, 17, 4097, CHUNK + 5, 2 * CHUNK + 1)):
        start = i % 7  # heads of 0 to 6 elements
        bases.append((randn(n + 7).to(dtypes[i % 4]), lambda b, s=start, n=n: b[s : s + n]))
    bases.append((randn(130, 67).to(torch.bfloat16), lambda b: b[1::2, 3:60]))
    bases.append((randn(7, 9, 11).to(torch.float16), lambda b: b[::3, 1:, ::2]))
    bases.append((randn(33, 5), lambda b: b.t()))
    bases.append((randn(3 * CHUNK) * 1e-30, lambda b: b))
    base, view = bases[7]
    poison = torch.tensor([math.nan, math.inf, -math.inf])
    view(base).view(-1)[[3, 100, CHUNK + 1]] = poison.to(base.dtype)
    base, view = bases[10]
    view(base)[0, 0, 0] = math.nan
    return [view(on_device(base)) for base, view in bases]


def make_params(grads: list[torch.Tensor]) -> list[torch.nn.Parameter]:
    params = [torch.nn.Parameter(torch.empty_like(g)) for g in grads]
    for p, g in zip(params, grads):
        p.grad = g
    return params


def report(ok: bool, what: str) -> bool:
    if not ok:
        print(f"sanitize_case: {what}")
    return ok


def check_stats(tensors: list[torch.Tensor], norm_type: float, policy: str) -> bool:
    """Counts exactly, norms and coefficient within RTOL, against the CPU kernel."""
    got = [t.cpu() for t in ops.stats(tensors, norm_type, 1.0, policy)]
    want = ops.stats([t.cpu() for t in tensors], norm_type, 1.0, policy)
    what = f"p={norm_type}, {policy}"
    ok = report(torch.equal(got[3], want[3]), f"counts differ from the CPU kernel's ({what})")
    for name, a, b in zip(("total norm", "coefficient", "norms"), got[:3], want[:3]):
        close = torch.allclose(a, b, rtol=RTOL, atol=0, equal_nan=True)
        ok &= report(close, f"{name} differs from the CPU kernel's ({what}): {a} against {b}")
    return ok


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bytes of a tensor, for bitwise comparisons (NaN == NaN)."""
    return t.reshape(-1).view(torch.uint8)


def same_as_functional(plan: gradstats.GradPlan, params: list, what: str) -> bool:
    a, b = plan.grad_stats(max_norm=1.0), gradstats.grad_stats(params, max_norm=1.0)
    pairs = ((a.total_norm, b.total_norm), (a.norms, b.norms), (a.counts, b.counts))
    same = all(torch.equal(bits(x), bits(y)) for x, y in pairs)
    return report(same, f"GradPlan's statistics differ from grad_stats' {what}")


def plan_case() -> bool:
    """GradPlan: planned, reused, then re-planned after a gradient changes layout; each call
    bitwise the functional one's."""
    params = make_params(make_tensors())
    plan = gradstats.GradPlan(params)
    ok = same_as_functional(plan, params, "when planned")
    ok &= same_as_functional(plan, params, "when reused")
    strided = params[11]  # a transposed view: its replacement is contiguous, another layout
    strided.grad = on_device(strided.grad.cpu())
    ok &= same_as_functional(plan, params, "after a re-plan")
    plan.clip_grad_norm_(0.5, on_nonfinite="zero")
    return ok & report(plan.builds == 2, f"GradPlan built {plan.builds} times, expected 2")


def feature_case() -> bool:
    """feature_stats of one piece (rows of features, NCHW runs) and of several (the combine
    kernel), against the CPU kernel."""
    gen = torch.Generator().manual_seed(1)
    features = torch.randn(300, 17, generator=gen)
    features[5, 3] = math.nan
    cases = [
        (on_device(features), 1),
        (on_device(torch.randn(4, 3, 9, 11, generator=gen).to(torch.bfloat16)), 1),
        (on_device(torch.randn(4096, 64, generator=gen)), 1),  # several pieces on any GPU
        (on_device(torch.randn(64, 8, 32, 32, generator=gen)), 1),  # several NCHW pieces
    ]
    if UNDER_INITCHECK:
        print("sanitize_case: initcheck: no non-contiguous feature_stats input (torch copies it)")
    else:
        cases.append((on_device(features)[::2], 1))
    ok = True
    for x, dim in cases:
        got = ops.feature_stats(x, dim).cpu()
        want = ops.feature_stats(x.cpu(), dim)
        same = torch.allclose(got, want, rtol=RTOL, atol=0, equal_nan=True)
        ok &= report(same, f"feature_stats differs from the CPU kernel's ({tuple(x.shape)})")
    return ok


def mixed_devices_case() -> bool:
    """A list of CUDA and CPU gradients, CUDA first: every gradient clipped by the one global
    coefficient (torch.nn.utils.clip_grad_norm_ on CPU copies says by how much)."""
    if UNDER_INITCHECK:
        print("sanitize_case: initcheck: no mixed-device list (torch combines its coefficient)")
        return True
    gen = torch.Generator().manual_seed(2)
    host = [torch.randn(n, generator=gen) * 10 for n in (1000, 37, 4097)]
    params = make_params([on_device(host[0]), host[1].clone(), on_device(host[2])])
    reference = make_params([h.clone() for h in host])
    gradstats.clip_grad_norm_(params, 1.0)
    torch.nn.utils.clip_grad_norm_(reference, 1.0)
    same = all(
        torch.allclose(p.grad.cpu(), r.grad, rtol=RTOL, atol=0) for p, r in zip(params, reference)
    )
    return report(same, "a mixed CPU+CUDA list was not clipped as torch clips it")


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
    tensors = make_tensors()
    for norm_type in NORM_TYPES:
        for policy in POLICIES:
            ok &= check_stats(tensors, norm_type, policy)

    for policy in POLICIES:
        params = make_params(make_tensors())  # the scale kernel writes through the same views
        gradstats.clip_grad_norm_(params, 0.5, on_nonfinite=policy)
        gradstats.clip_grad_norm_(params, 1e30, on_nonfinite=policy)  # nothing to clip: skipped
    writable = make_tensors()
    for dtype in (torch.float64, torch.float16, torch.bfloat16):
        ops.scale_(writable, torch.tensor(0.5, device=DEVICE, dtype=dtype))

    host = torch.randn(LONG_LIST * 51, generator=torch.Generator().manual_seed(3))
    host[(LONG_LIST - 1) * 51 + (LONG_LIST - 1) % 3] = math.inf  # the last tensor's first element
    whole = on_device(host)
    long_list = [whole[i * 51 + i % 3 : i * 51 + i % 3 + 1 + i % 48] for i in range(LONG_LIST)]
    ok &= check_stats(long_list, 2.0, "zero")
    gradstats.clip_grad_norm_(make_params(long_list), 1.0)
    ops.scale_(long_list, torch.tensor(0.5, device=DEVICE))

    ok &= plan_case()
    ok &= feature_case()
    ok &= mixed_devices_case()

    torch.cuda.synchronize(DEVICE)
    print("sanitize_case: ok" if ok else "sanitize_case: FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
