"""Statistics taken inside the gradient reduction (gradstats.distributed.attach), on 2 and 4 gloo
ranks: DDP (default all-reduce, fp16 and bf16 compression) and FSDP2. At the step the clip reads no
gradient (no statistics pass), gives torch's norm and clipped gradients, and falls back to a pass
when the gradients changed after the reduction; gradient accumulation counts the final reduction
only."""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
import torch.distributed as dist
from dist_helpers import spawn
from torch import nn

import gradstats

if not dist.is_available():
    pytest.skip("torch was built without torch.distributed", allow_module_level=True)

from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

WORLD_SIZES = (2, 4)
LAYERS, WIDTH, BATCH = 4, 16, 8
MAX_NORM = 0.05  # below the gradient norms: every step clips
SEED = 0
RTOL = 1e-6  # per-bucket float64 partials combined, against torch's one norm
# The DDP communication hooks the statistics compose with (None: DDP's default all-reduce).
DDP_HOOKS = {
    "allreduce": None,
    "fp16": default_hooks.fp16_compress_hook,
    "bf16": default_hooks.bf16_compress_hook,
}


def model() -> nn.Module:
    torch.manual_seed(SEED)
    return nn.Sequential(*[nn.Linear(WIDTH, WIDTH) for _ in range(LAYERS)])


def batch(rank: int, step: int) -> torch.Tensor:
    return torch.randn(BATCH, WIDTH, generator=torch.Generator().manual_seed(100 * step + rank))


@contextlib.contextmanager
def count_passes():
    """Counts the statistics passes over gradients (functional or planned)."""
    passes = [0]
    real_stats, real_plan = gradstats.ops.stats, gradstats.ops.plan_stats

    def stats(*args, **kwargs):
        passes[0] += 1
        return real_stats(*args, **kwargs)

    def plan_stats(*args, **kwargs):
        passes[0] += 1
        return real_plan(*args, **kwargs)

    gradstats.ops.stats, gradstats.ops.plan_stats = stats, plan_stats
    try:
        yield passes
    finally:
        gradstats.ops.stats, gradstats.ops.plan_stats = real_stats, real_plan


def clipped(params) -> tuple[float, list[torch.Tensor]]:
    """gradstats' clip at the step, with the number of statistics passes it made."""
    with count_passes() as passes:
        norm = gradstats.clip_grad_norm_(params, MAX_NORM)
    grads = [p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad for p in params]
    return float(norm), [g.clone() for g in grads], passes[0]


def torch_clipped(params) -> tuple[float, list[torch.Tensor]]:
    norm = torch.nn.utils.clip_grad_norm_(params, MAX_NORM)
    norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
    grads = [p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad for p in params]
    return float(norm), [g.clone() for g in grads]


def run_ddp(rank: int, world: int, calls: list[int]) -> dict:
    """For each DDP communication hook: the step after one backward, after a no_sync
    accumulation, and after the gradients were changed in place (a fallback pass)."""
    out: dict = {}
    for name, hook in DDP_HOOKS.items():
        ours = nn.parallel.DistributedDataParallel(model())
        stock = nn.parallel.DistributedDataParallel(model())
        if hook is not None:
            stock.register_comm_hook(None, hook)
        handle = gradstats.distributed.attach(ours, ddp_hook=hook)
        record: dict = {}
        for case in ("one", "accumulated", "changed"):
            for net in (ours, stock):
                net.zero_grad()
                if case == "accumulated":
                    with net.no_sync():
                        net(batch(rank, 0)).square().mean().backward()
                net(batch(rank, 1)).square().mean().backward()
            if case == "changed":  # as a GradScaler's unscale_ would, after the reduction
                for p in ours.parameters():
                    p.grad.mul_(0.5)
                for p in stock.parameters():
                    p.grad.mul_(0.5)
            record[case] = {"ours": clipped(list(ours.parameters()))}
            record[case]["stock"] = torch_clipped(list(stock.parameters()))
        handle.detach()
        out[name] = record
    return out


def fsdp2_model(world: int) -> nn.Module:
    net = model()
    mesh = init_device_mesh("cpu", (world,))
    for layer in net:
        fully_shard(layer, mesh=mesh)
    fully_shard(net, mesh=mesh)
    return net


def run_fsdp2(rank: int, world: int, calls: list[int]) -> dict:
    """The step after one backward, after accumulation without reduction
    (set_requires_gradient_sync(False)) and with a reduction every micro-batch (accumulating into
    the sharded gradients); a ClipGradOptimizer step reads no gradient either."""
    ours, stock = fsdp2_model(world), fsdp2_model(world)
    handle = gradstats.distributed.attach(ours)
    out: dict = {}
    for case in ("one", "no_sync", "sync_each"):
        for net in (ours, stock):
            net.zero_grad()
            if case != "one":
                net.set_requires_gradient_sync(case == "sync_each")
                net(batch(rank, 0)).square().mean().backward()
                net.set_requires_gradient_sync(True)
            net(batch(rank, 1)).square().mean().backward()
        out[case] = {"ours": clipped(list(ours.parameters()))}
        out[case]["stock"] = torch_clipped(list(stock.parameters()))
    opt = gradstats.ClipGradOptimizer(torch.optim.SGD(ours.parameters(), lr=0.1), MAX_NORM)
    opt.zero_grad()
    ours(batch(rank, 2)).square().mean().backward()
    with count_passes() as passes:
        opt.step()
    out["optimizer_passes"] = passes[0]
    out["optimizer_norm"] = float(opt.last_stats.total_norm)
    handle.detach()
    return out


SCENARIOS = {"ddp": (run_ddp, WORLD_SIZES), "fsdp2": (run_fsdp2, WORLD_SIZES)}


@pytest.fixture(scope="module", params=WORLD_SIZES, ids=lambda w: f"{w}ranks")
def ranks(request, tmp_path_factory) -> list[dict]:
    out_dir = tmp_path_factory.mktemp(f"world{request.param}")
    return spawn(request.param, out_dir, __name__)


def assert_matches_torch(record: dict, what: str) -> None:
    (norm, grads, _), (want_norm, want_grads) = record["ours"], record["stock"]
    assert norm == pytest.approx(want_norm, rel=RTOL), what
    for g, w in zip(grads, want_grads):
        torch.testing.assert_close(g, w, rtol=RTOL, atol=0, msg=what)


@pytest.mark.parametrize("hook", list(DDP_HOOKS))
def test_ddp_step_reads_no_gradient_and_matches_torch(ranks, hook):
    for rank, result in enumerate(ranks):
        for case in ("one", "accumulated"):
            record = result["ddp"][hook][case]
            assert_matches_torch(record, f"rank {rank}, {case}")
            assert record["ours"][2] == 0, f"rank {rank}, {case}: a statistics pass at the step"


@pytest.mark.parametrize("hook", list(DDP_HOOKS))
def test_ddp_gradients_changed_after_the_reduction_take_a_pass(ranks, hook):
    for result in ranks:
        record = result["ddp"][hook]["changed"]
        assert_matches_torch(record, "changed after the reduction")
        assert record["ours"][2] == 1  # the partials were stale: one pass of its own


@pytest.mark.parametrize("case", ["one", "no_sync", "sync_each"])
def test_fsdp2_step_reads_no_gradient_and_matches_torch(ranks, case):
    for rank, result in enumerate(ranks):
        record = result["fsdp2"][case]
        assert_matches_torch(record, f"rank {rank}, {case}")
        assert record["ours"][2] == 0, f"rank {rank}, {case}: a statistics pass at the step"


def test_fsdp2_clip_grad_optimizer_step_reads_no_gradient(ranks):
    assert [r["fsdp2"]["optimizer_passes"] for r in ranks] == [0] * len(ranks)
    assert len({r["fsdp2"]["optimizer_norm"] for r in ranks}) == 1
    assert all(math.isfinite(r["fsdp2"]["optimizer_norm"]) for r in ranks)


def test_attach_refuses_what_it_cannot_combine():
    with pytest.raises(RuntimeError, match="not initialized"):
        gradstats.distributed.attach(model())
    with pytest.raises(ValueError, match="p > 0"):
        gradstats.distributed.attach(model(), norm_type=0)
