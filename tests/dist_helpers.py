"""Ranks spawned on loopback for the distributed tests: gloo on CPU, one process per rank.

Each world size is spawned once per test module (importing torch takes seconds per process): its
ranks run every scenario of the module's SCENARIOS and save what they computed, and the tests
compare that in the parent process. A rank that hangs fails the run after RUN_TIMEOUT_S
(collectives themselves give up after COLLECTIVE_TIMEOUT_S).
"""

from __future__ import annotations

import datetime
import importlib
import os
import traceback
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

LOOPBACK = "127.0.0.1"
COLLECTIVE_TIMEOUT_S = 30
# Generous for 4 processes importing torch on 2 busy cores; only a hang gets near it.
RUN_TIMEOUT_S = 150


def count_all_reduces() -> list[int]:
    """Wraps dist.all_reduce (which gradstats.distributed calls) to count calls: one list entry."""
    calls = [0]
    real = dist.all_reduce

    def counting(*args, **kwargs):
        calls[0] += 1
        return real(*args, **kwargs)

    dist.all_reduce = counting
    return calls


def worker(rank: int, world: int, port: int, out_dir: str, module: str) -> None:
    """One rank: every scenario of the test module's SCENARIOS (name -> (function, world sizes)),
    results (or the traceback) saved to out_dir/rank<rank>.pt."""
    torch.set_num_threads(1)  # the ranks share two cores
    result: dict = {}
    try:
        timeout = datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S)
        store = dist.TCPStore(LOOPBACK, port, is_master=False, timeout=timeout)
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=timeout)
        calls = count_all_reduces()
        scenarios = importlib.import_module(module).SCENARIOS
        for name, (scenario, sizes) in scenarios.items():
            if world in sizes:
                result[name] = scenario(rank, world, calls)
    except Exception:
        result["error"] = traceback.format_exc()
    finally:
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
        if dist.is_initialized():
            dist.destroy_process_group()


def spawn(world: int, out_dir: Path, module: str) -> list[dict]:
    """Runs `world` ranks of the test module's scenarios and returns each rank's results; fails on
    a hang, crash or error."""
    store = dist.TCPStore(LOOPBACK, 0, is_master=True, wait_for_workers=False)
    ctx = mp.get_context("spawn")
    procs = [
        ctx.Process(
            target=worker, args=(rank, world, store.port, str(out_dir), module), daemon=True
        )
        for rank in range(world)
    ]
    for proc in procs:
        proc.start()
    deadline = datetime.datetime.now() + datetime.timedelta(seconds=RUN_TIMEOUT_S)
    for proc in procs:
        proc.join(max(0.0, (deadline - datetime.datetime.now()).total_seconds()))
    hung = [rank for rank, proc in enumerate(procs) if proc.is_alive()]
    for rank in hung:
        procs[rank].kill()
        procs[rank].join()
    if hung:
        pytest.fail(f"ranks {hung} of {world} did not finish within {RUN_TIMEOUT_S} s")
    results, errors = [], []
    for rank, proc in enumerate(procs):
        path = out_dir / f"rank{rank}.pt"
        if not path.exists():
            errors.append(f"rank {rank} exited with {proc.exitcode} and saved nothing")
            continue
        result = torch.load(path)
        if "error" in result:
            errors.append(f"rank {rank} failed:\n{result['error']}")
        results.append(result)
    if errors:
        # Every rank's: the first to fail makes the others fail in their next collective.
        pytest.fail(f"{len(errors)} of {world} ranks failed\n" + "\n".join(errors))
    return results
