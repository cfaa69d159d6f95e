"""GPU stress and tail timings for benchmarks/gpu_check.sh (needs a CUDA device).

Stress, each result compared bitwise with one sequential run of the same inputs:
- two streams, CALLS_PER_STREAM calls of stats + clip each, interleaved with no host waits,
  each stream counting its own mismatches;
- a CUDA graph of stats + clip captured once and replayed GRAPH_REPLAYS times, its inputs
  refilled before every replay;
- the default path under torch.cuda.set_sync_debug_mode("error"): no host synchronisation.

Tail timings (issue 17, item 7), CUDA events around the statistics op alone: 1,216 tensors of 1,000
elements against one tensor of the same 1,216,000 elements, and the 161 ResNet-50 gradient tensors,
each as GB/s of the bytes read against a device-to-device copy of the same size measured in the
same run. A costly finish step (each tensor's partials combined, then the totals) shows as the
many-tensor case falling far below the one-tensor case.

    python benchmarks/gpu_stress.py --json OUT.json
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import torch

import gradstats
from gradstats.bench.presets import make_preset
from gradstats.bench.report import write_atomically

CALLS_PER_STREAM = 200
GRAPH_REPLAYS = 1_000
MAX_NORM = 1.0
# The tail case: as many tensors as one large launch table holds (csrc/cuda/planner.h).
TAIL_TENSORS, TAIL_ELEMS = 1_216, 1_000
TIMED_REPEATS, WARMUP = 50, 5
BYTES_PER_GB = 1e9
MS_PER_S = 1e3


def make_grads(seed: int, shapes: list[tuple[int, ...]], dtype=torch.float32) -> list[torch.Tensor]:
    gen = torch.Generator(device="cuda").manual_seed(seed)
    return [torch.randn(s, generator=gen, device="cuda").to(dtype) for s in shapes]


def make_params(grads: list[torch.Tensor]) -> list[torch.nn.Parameter]:
    params = [torch.nn.Parameter(torch.empty_like(g)) for g in grads]
    for p, g in zip(params, grads):
        p.grad = g
    return params


def stats_and_clip(params: list[torch.nn.Parameter]) -> list[torch.Tensor]:
    """The statistics and the clip, as a training step runs them: all outputs on the device."""
    st = gradstats.grad_stats(params, max_norm=MAX_NORM)
    norm = gradstats.clip_grad_norm_(params, MAX_NORM)
    return [st.total_norm, st.norms, st.counts, norm, *(p.grad for p in params)]


def differing(a: list[torch.Tensor], b: list[torch.Tensor]) -> torch.Tensor:
    """How many of the tensors differ in any bit (0-dim, on the device: no host wait)."""
    same = [
        (x.reshape(-1).view(torch.uint8) == y.reshape(-1).view(torch.uint8)).all()
        for x, y in zip(a, b)
    ]
    return (~torch.stack(same)).sum()


SHAPES = [(1000, 257), (4097,), (0,), (65536 + 3,), (31, 7), (2,)]


def two_streams() -> dict:
    inputs = [make_grads(i, SHAPES) for i in range(2)]
    expected = [stats_and_clip(make_params([g.clone() for g in grads])) for grads in inputs]
    params = [make_params([g.clone() for g in grads]) for grads in inputs]
    streams = [torch.cuda.Stream() for _ in inputs]
    # A counter per stream: one tensor updated from both streams would race (its += unordered).
    mismatches = [torch.zeros((), dtype=torch.int64, device="cuda") for _ in streams]
    for stream in streams:
        stream.wait_stream(torch.cuda.current_stream())
    for _ in range(CALLS_PER_STREAM):
        for k, stream in enumerate(streams):
            with torch.cuda.stream(stream):
                for p, g in zip(params[k], inputs[k]):
                    p.grad.copy_(g)
                mismatches[k] += differing(stats_and_clip(params[k]), expected[k])
    torch.cuda.synchronize()
    per_stream = [int(m) for m in mismatches]
    return {
        "calls": len(streams) * CALLS_PER_STREAM,
        "mismatches": sum(per_stream),
        "mismatches_per_stream": per_stream,
    }


def graph_replays() -> dict:
    source = make_grads(7, SHAPES)
    expected = stats_and_clip(make_params([g.clone() for g in source]))
    params = make_params([g.clone() for g in source])
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture, as torch's graph docs advise
        stats_and_clip(make_params([g.clone() for g in source]))
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = stats_and_clip(params)
    mismatches = torch.zeros((), dtype=torch.int64, device="cuda")
    for _ in range(GRAPH_REPLAYS):
        for p, g in zip(params, source):
            p.grad.copy_(g)
        graph.replay()
        mismatches += differing(outputs, expected)
    torch.cuda.synchronize()
    return {"replays": GRAPH_REPLAYS, "mismatches": int(mismatches)}


def no_sync_default_path() -> dict:
    params = make_params(make_grads(3, SHAPES))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        gradstats.clip_grad_norm_(params, MAX_NORM)
        gradstats.grad_stats(params, max_norm=MAX_NORM)
        error = None
    except RuntimeError as exc:
        error = str(exc)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return {"synced": error is not None, "error": error}


def median_ms(fn: Callable[[], object]) -> float:
    for _ in range(WARMUP):
        fn()
    times = []
    for _ in range(TIMED_REPEATS):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def tail_case(name: str, shapes: list[tuple[int, ...]], dtype: torch.dtype) -> dict:
    grads = make_grads(11, shapes, dtype)
    numel = sum(g.numel() for g in grads)
    nbytes = numel * grads[0].element_size()
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    copy_ms = median_ms(lambda: dst.copy_(src))
    stats_ms = median_ms(lambda: torch.ops.gradstats.stats(grads, 2.0, MAX_NORM, "propagate"))
    copy_gbs = 2 * nbytes / (copy_ms / MS_PER_S) / BYTES_PER_GB  # a copy reads and writes
    stats_gbs = nbytes / (stats_ms / MS_PER_S) / BYTES_PER_GB
    return {
        "case": name,
        "tensors": len(grads),
        "dtype": str(dtype).removeprefix("torch."),
        "bytes": nbytes,
        "stats_ms": stats_ms,
        "stats_gbs": stats_gbs,
        "copy_gbs": copy_gbs,
        "of_copy": stats_gbs / copy_gbs,
    }


def tail_timings() -> list[dict]:
    resnet = [tuple(s) for s in make_preset("resnet50").shapes]
    cases = [
        ("1,216 x 1,000", [(TAIL_ELEMS,)] * TAIL_TENSORS),
        ("1 x 1,216,000", [(TAIL_TENSORS * TAIL_ELEMS,)]),
        ("resnet50 (161 tensors)", resnet),
    ]
    return [tail_case(name, shapes, dtype) for name, shapes in cases for dtype in (torch.float32,)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("gpu_stress: no CUDA device")
        return 1
    results = {
        "device": torch.cuda.get_device_name(),
        "two_streams": two_streams(),
        "graph_replays": graph_replays(),
        "no_sync": no_sync_default_path(),
        "tail": tail_timings(),
    }
    ok = (
        results["two_streams"]["mismatches"] == 0
        and results["graph_replays"]["mismatches"] == 0
        and not results["no_sync"]["synced"]
        and all(math.isfinite(row["stats_ms"]) for row in results["tail"])
    )
    text = json.dumps(results, indent=2)
    print(text)
    if args.json:
        write_atomically(Path(args.json), text + "\n")
        print(f"wrote {args.json}")
    print("gpu_stress: ok" if ok else "gpu_stress: FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
