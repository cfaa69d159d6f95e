"""What GradMonitor adds to a training step: time and host reads.

A ~1M-parameter MLP trains with Adam on random data, on the CPU by default. Each configuration gets
its own copy of the model; after a warm-up, repetitions of a block of steps are timed with the
configurations interleaved in a new random order every repetition (so that other processes on a
shared machine slow all of them alike). Reported: the median wall time per step, and the medians
over repetitions of the paired ratios (a configuration's time over its baseline's in the same
repetition) of wall time and of process CPU time; when other processes compete for the cores,
CPU time, which counts only this process's work, is the steadier of the two.

  plain            forward, backward, Adam
  + monitor        the same plus monitor.step() (its own fused pass) and the input hook, which
                   reads the input once for its per-feature statistics
  + monitor(nofeat) the same with feature_dim=None: the input read as a whole (the fused stats op)
  clip             forward, backward, grad_stats + clip (what a clipping optimizer does), Adam
  clip + monitor   the same plus monitor.step(stats=..., params=...) reusing those statistics
  + monitor(all)   plain plus monitor.step() with every leaf module's output watched

Host reads (Tensor.item/tolist/cpu/..., each a device sync on a GPU) and aten ops are counted per
step as well: unlike times, those counts do not depend on what else runs on the machine.

    python benchmarks/monitor_overhead.py [--device cpu] [--batch 64] [--threads N] [--reps 100]
"""

from __future__ import annotations

import argparse
import copy
import platform
import random
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import gradstats
from gradstats.bench.reads import counting_host_reads

IN, HIDDEN, MIDDLE, OUT = 512, 1024, 512, 10
MAX_NORM = 1.0
WARMUP_STEPS = 10


def make_model() -> nn.Module:
    return nn.Sequential(
        nn.Linear(IN, HIDDEN),
        nn.ReLU(),
        nn.Linear(HIDDEN, MIDDLE),
        nn.ReLU(),
        nn.Linear(MIDDLE, OUT),
    )


def make_step(name: str, base: nn.Module, device: str, batch: int) -> Callable[[], None]:
    model = copy.deepcopy(base).to(device)
    params = list(model.parameters())
    optimizer = torch.optim.Adam(params, lr=1e-4)
    x = torch.randn(batch, IN, device=device)
    y = torch.randint(0, OUT, (batch,), device=device)
    monitor = None
    if "monitor" in name:
        monitor = gradstats.GradMonitor(
            model,
            watch_modules="all" if "(all)" in name else None,
            feature_dim=None if "(nofeat)" in name else "auto",
        )
    clip = name.startswith("clip")

    def step() -> None:
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=False)
        loss.backward()
        if clip:
            stats = gradstats.grad_stats(params, max_norm=MAX_NORM)
            gradstats.clip_grads_with_norm_(params, MAX_NORM, stats.total_norm)
            if monitor is not None:
                monitor.step(stats=stats, params=params)
        elif monitor is not None:
            monitor.step()
        optimizer.step()

    return step


def host_reads_per_step(step: Callable[[], None], steps: int) -> float:
    with counting_host_reads() as counts:
        for _ in range(steps):
            step()
    return counts.total() / steps


class _OpCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        return func(*args, **(kwargs or {}))


def ops_per_step(step: Callable[[], None]) -> int:
    with _OpCounter() as counter:
        step()
    return counter.ops


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument(
        "--threads", type=int, default=0, help="intra-op threads (default: torch's choice)"
    )
    parser.add_argument("--reps", type=int, default=100, help="timed repetitions per configuration")
    parser.add_argument("--steps", type=int, default=5, help="training steps per repetition")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    base = make_model()
    names = ["plain", "+ monitor", "+ monitor(nofeat)", "clip", "clip + monitor", "+ monitor(all)"]
    steps = {name: make_step(name, base, args.device, args.batch) for name in names}
    for step in steps.values():
        for _ in range(WARMUP_STEPS):
            step()
    sync(args.device)

    times: dict[str, list[float]] = {name: [] for name in names}
    cpu: dict[str, list[float]] = {name: [] for name in names}
    order = random.Random(args.seed)
    for _ in range(args.reps):
        shuffled = names[:]
        order.shuffle(shuffled)
        for name in shuffled:
            sync(args.device)
            start, start_cpu = time.perf_counter(), time.process_time()
            for _ in range(args.steps):
                steps[name]()
            sync(args.device)
            times[name].append((time.perf_counter() - start) / args.steps)
            cpu[name].append((time.process_time() - start_cpu) / args.steps)
    reads = {name: host_reads_per_step(steps[name], args.steps) for name in names}
    ops = {name: ops_per_step(steps[name]) for name in names}

    n_params = sum(p.numel() for p in base.parameters())
    print(
        f"GradMonitor overhead: {n_params / 1e6:.2f}M-parameter MLP, batch {args.batch}, Adam, "
        f"{args.device} ({platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads), torch {torch.__version__}"
    )
    print(f"median of {args.reps} interleaved repetitions of {args.steps} steps, after warm-up")
    print(
        f"{'configuration':<18} {'ms/step':>8} {'baseline':>9} {'wall':>7} {'added':>7} "
        f"{'cpu':>7} {'added':>7} {'host reads/step':>16} {'aten ops/step':>14}"
    )
    for name in names:
        base_name = "clip" if name.startswith("clip") else "plain"
        median = statistics.median(times[name])
        wall = statistics.median(a / b for a, b in zip(times[name], times[base_name]))
        cpu_ratio = statistics.median(a / b for a, b in zip(cpu[name], cpu[base_name]))
        added = reads[name] - reads[base_name]
        print(
            f"{name:<18} {median * 1e3:>8.3f} {base_name:>9} {wall:>7.3f} "
            f"{(wall - 1) * 100:>+6.1f}% {cpu_ratio:>7.3f} {(cpu_ratio - 1) * 100:>+6.1f}% "
            f"{reads[name]:>9.1f} ({added:+.0f}) {ops[name]:>7} ({ops[name] - ops[base_name]:+d})"
        )


if __name__ == "__main__":
    main()
