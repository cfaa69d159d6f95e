"""Where the CPU time of gradstats and torch goes: per-element compute rate, per-tensor overhead.

    PYTHONPATH=. python benchmarks/cpu_breakdown.py [--threads N]

Three tables, for explaining a speed target that misses:
1. compute rate: elements per second per thread on cache-resident data (1 thread), gradstats'
   statistics op against torch's foreach norm and sum(), per dtype. A rate times the threads that
   is below the memory floor's elements per second makes that path compute-bound.
2. thread scaling: gradstats' statistics and a float32 sum() over GPT-2-sized memory, 1 and 2+
   threads: whether one thread can saturate memory on this machine.
3. per-tensor overhead: the steps of clip_grad_norm_ on many small tensors (Python wrapper, the
   ops alone, torch's pieces), warm (the same tensors again and again) and cold (a sweep through
   a buffer twice the last-level cache before each call, as the benchmark does), which sets the
   many-tensor speedups.
Minimums over the repeats are shown next to medians: on a shared machine the minimum is the
uncontended cost.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
from collections.abc import Callable

import torch

import gradstats
from gradstats import ops
from gradstats._core import collect_grads
from gradstats.bench.env import cpu_cache_bytes
from gradstats.bench.presets import gpt2_small

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
CACHE_RESIDENT_ELEMS = 1 << 20  # 4 MB in float32: in the last-level cache, not in memory
CACHE_TENSORS = 16
LISTS = ((2_000, 64), (10_000, 1_000), (1_000, 4_096))  # tensors, values each
SWEEP_CACHES = 2
FLOAT32_BYTES = 4
REPEATS = 30
WARMUP = 3
US_PER_S = 1e6
GIGA = 1e9


def timed(
    fn: Callable[[], object], repeats: int = REPEATS, before: Callable[[], object] | None = None
) -> tuple[float, float]:
    """(median, min) seconds of fn, garbage collector off; before() runs untimed ahead of each."""
    for _ in range(WARMUP):
        fn()
    gc.disable()
    try:
        times = []
        for _ in range(repeats):
            if before is not None:
                before()
            begin = time.perf_counter()
            fn()
            times.append(time.perf_counter() - begin)
    finally:
        gc.enable()
    return statistics.median(times), min(times)


def compute_rates() -> list[str]:
    torch.set_num_threads(1)
    lines = [
        "| dtype | gradstats stats | torch foreach norm | torch sum() |",
        "|---|---|---|---|",
    ]
    size = CACHE_RESIDENT_ELEMS // CACHE_TENSORS
    for dtype in DTYPES:
        tensors = [torch.randn(size, dtype=dtype) for _ in range(CACHE_TENSORS)]
        flat = torch.cat(tensors)
        cells = []
        for fn in (
            lambda t=tensors: ops.stats(t, 2.0, float("inf")),
            lambda t=tensors: torch._foreach_norm(t, 2.0),
            lambda f=flat: f.sum(),
        ):
            _, best = timed(fn)
            cells.append(f"{CACHE_RESIDENT_ELEMS / best / GIGA:.2f} G/s")
        lines.append(f"| {str(dtype).removeprefix('torch.')} | " + " | ".join(cells) + " |")
    return lines


def thread_scaling(max_threads: int) -> list[str]:
    preset = gpt2_small()
    grads = [torch.randn(shape) for shape in preset.shapes]
    flat = torch.randn(preset.numel)
    nbytes = flat.nbytes
    lines = ["| threads | gradstats stats GB/s | sum() GB/s |", "|---|---|---|"]
    for threads in sorted({1, max_threads}):
        torch.set_num_threads(threads)
        _, ours = timed(lambda: ops.stats(grads, 2.0, float("inf")), REPEATS // 3)
        _, floor = timed(lambda: flat.sum(), REPEATS // 3)
        lines.append(f"| {threads} | {nbytes / ours / GIGA:.1f} | {nbytes / floor / GIGA:.1f} |")
    return lines


def per_tensor_overhead(threads: int, count: int, size: int) -> list[str]:
    torch.set_num_threads(threads)
    grads = [torch.randn(size) for _ in range(count)]
    params = []
    for g in grads:
        p = torch.nn.Parameter(torch.zeros(size))
        p.grad = g
        params.append(p)
    sweep = torch.randn(SWEEP_CACHES * cpu_cache_bytes() // FLOAT32_BYTES).sum
    big = float("inf")
    coef = torch.tensor(0.5)

    def group_by_device() -> None:
        by_device: dict[torch.device, list[int]] = {}
        for i, t in enumerate(grads):
            by_device.setdefault(t.device, []).append(i)

    steps = {
        "gradstats.clip_grad_norm_ (nothing to clip)": lambda: gradstats.clip_grad_norm_(
            params, big
        ),
        "gradstats.clip_grad_norm_ (clips)": lambda: gradstats.clip_grad_norm_(params, 1e-3),
        "gradstats.get_total_norm": lambda: gradstats.get_total_norm(grads),
        "gradstats.grad_stats": lambda: gradstats.grad_stats(grads),
        "  [p.grad for p in params]": lambda: collect_grads(params),
        "  group by t.device (Python loop, once per op)": group_by_device,
        "  stats op alone": lambda: ops.stats(grads, 2.0, big),
        "  scale_ op alone, clipping": lambda: ops.scale_(grads, coef),
        "torch clip_grad_norm_": lambda: torch.nn.utils.clip_grad_norm_(params, big),
        "torch get_total_norm": lambda: torch.nn.utils.get_total_norm(grads),
        "  torch._foreach_norm": lambda: torch._foreach_norm(grads, 2.0),
        "  torch._foreach_mul_": lambda: torch._foreach_mul_(grads, coef),
    }
    lines = [
        f"| {count:,} x {size:,} float32, {threads} threads | warm median us | warm min us "
        "| cold median us | cold min us | cold min us per tensor |",
        "|---|---|---|---|---|---|",
    ]
    for name, fn in steps.items():
        median, best = timed(fn)
        cold_median, cold_best = timed(fn, before=sweep)
        cells = [median, best, cold_median, cold_best]
        lines.append(
            f"| {name} | "
            + " | ".join(f"{c * US_PER_S:.0f}" for c in cells)
            + f" | {cold_best * US_PER_S / count:.3f} |"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    print("Compute rate, 1 thread, cache-resident data (elements per second):\n")
    print("\n".join(compute_rates()))
    print("\nThread scaling on GPT-2-small float32 gradients (from memory, best of repeats):\n")
    print("\n".join(thread_scaling(args.threads)))
    for count, size in LISTS:
        print("\nPer-tensor overhead:\n")
        print("\n".join(per_tensor_overhead(args.threads, count, size)))


if __name__ == "__main__":
    main()
