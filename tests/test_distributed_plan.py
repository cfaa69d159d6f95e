"""GradPlan and ClipGradOptimizer over DTensor gradients (FSDP2, several meshes): the planned
path on 2 and 4 gloo ranks gives the functional path's results, the full global norm as a plain
tensor, NaN on one rank seen by all, and keeps its plan across zero_grad(set_to_none=True)."""

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

from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard
from torch.distributed.tensor import distribute_tensor as distribute

WORLD_SIZES = (2, 4)
LAYERS, WIDTH, BATCH = 6, 8, 8
STEPS = 3
NAN_STEP = 1  # a NaN in one rank's local gradient shard at this step
MAX_NORM = 0.05  # below the model's gradient norms: every step clips
NORM_TYPES = (2.0, math.inf, 3.0)
SEED = 0


def model() -> nn.Module:
    torch.manual_seed(SEED)
    return nn.Sequential(*[nn.Linear(WIDTH, WIDTH) for _ in range(LAYERS)])


def batch(step: int) -> torch.Tensor:
    return torch.randn(BATCH, WIDTH, generator=torch.Generator().manual_seed(SEED + step))


def full_grads(params: list[nn.Parameter]) -> list[torch.Tensor]:
    """Every gradient as the whole tensor (the same on every rank)."""
    return [p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad for p in params]


@contextlib.contextmanager
def count_functional_passes():
    """Counts the functional path's stats op calls (the planned path makes none)."""
    passes = [0]
    real = gradstats.ops.stats

    def counted(*args, **kwargs):
        passes[0] += 1
        return real(*args, **kwargs)

    gradstats.ops.stats = counted
    try:
        yield passes
    finally:
        gradstats.ops.stats = real


def run_fsdp2_plan(rank: int, world: int, calls: list[int]) -> dict:
    """Per step (new gradients each step): the planned statistics and the functional ones on the
    same gradients, the planned clip's norm and its type, the gradients before and after it."""
    net = model()
    mesh = init_device_mesh("cpu", (world,))
    for layer in net:
        fully_shard(layer, mesh=mesh)
    fully_shard(net, mesh=mesh)
    params = list(net.parameters())
    plan = gradstats.GradPlan(params)
    out: dict = {"steps": []}
    for step in range(STEPS):
        for p in params:
            p.grad = None  # zero_grad(set_to_none=True)
        net(batch(step)).square().mean().backward()
        if step == NAN_STEP and rank == world - 1:
            params[2].grad.to_local().view(-1)[0] = math.nan
        record: dict = {}
        for p in NORM_TYPES:
            planned = plan.grad_stats(p, MAX_NORM)
            functional = gradstats.grad_stats(params, p, MAX_NORM)
            record[str(p)] = {
                "planned": (planned.total_norm, planned.norms, planned.counts, planned.clip_coef),
                "functional": (
                    functional.total_norm,
                    functional.norms,
                    functional.counts,
                    functional.clip_coef,
                ),
            }
        record["before"] = full_grads(params)
        with count_functional_passes() as passes:
            norm = plan.clip_grad_norm_(MAX_NORM, on_nonfinite="skip")
        record["functional_passes"] = passes[0]
        with count_functional_passes() as passes:
            gradstats.grad_stats(params)
        record["functional_passes_control"] = passes[0]
        record["norm"] = norm
        record["norm_type"] = type(norm).__name__
        record["after"] = full_grads(params)
        out["steps"].append(record)
    out["builds"] = plan.builds
    return out


def run_optimizer(rank: int, world: int, calls: list[int]) -> dict:
    """ClipGradOptimizer over FSDP2 with zero_grad(set_to_none=True): the planned path must plan
    once and skip the NaN step on every rank."""
    net = model()
    mesh = init_device_mesh("cpu", (world,))
    for layer in net:
        fully_shard(layer, mesh=mesh)
    fully_shard(net, mesh=mesh)
    opt = gradstats.ClipGradOptimizer(torch.optim.SGD(net.parameters(), lr=0.1), MAX_NORM)
    norms = []
    for step in range(STEPS):
        opt.zero_grad()
        net(batch(step)).square().mean().backward()
        if step == NAN_STEP and rank == 0:
            next(net.parameters()).grad.to_local().view(-1)[0] = math.nan
        opt.step()
        norms.append(opt.last_stats.total_norm)
    weights = [p.full_tensor() for p in net.parameters()]
    return {
        "norms": torch.stack(norms),
        "skipped": opt.skipped_steps.clone(),
        "builds": opt.plan.builds,
        "weights": weights,
    }


def run_meshes(rank: int, world: int, calls: list[int]) -> dict:
    """Parameters on two meshes (one over every rank, sharded; a 2-D one, sharded along one
    dimension and replicated along the other, as expert and data parallelism mix), a Partial
    gradient (summed first: the functional path) and a plain (replicated) one: one norm."""
    gen = torch.Generator().manual_seed(SEED)
    wholes = [torch.randn(8, 3, generator=gen), torch.randn(6, 4, generator=gen)]
    wholes += [torch.randn(5, generator=gen), torch.randn(4, 2, generator=gen)]
    flat = init_device_mesh("cpu", (world,))
    grid = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("ep", "dp"))
    grads = [
        distribute(wholes[0], flat, [Shard(0)]),
        distribute(wholes[1], grid, [Shard(0), Replicate()]),
        wholes[2].clone(),
    ]
    params = [nn.Parameter(torch.zeros_like(g)) for g in grads]
    for p, g in zip(params, grads):
        p.grad = g
    plan = gradstats.GradPlan(params)
    out = {"sharded": plan.grad_stats(2.0, MAX_NORM).total_norm}
    # A Partial gradient: each rank holds a summand of the whole (wholes[3] / world).
    partial = DTensor.from_local(wholes[3] / world, flat, [Partial()])
    params.append(nn.Parameter(torch.zeros(4, 2)))
    params[-1].grad = partial
    out["with_partial"] = gradstats.GradPlan(params).grad_stats(2.0).total_norm
    return out


SCENARIOS = {
    "fsdp2_plan": (run_fsdp2_plan, WORLD_SIZES),
    "optimizer": (run_optimizer, WORLD_SIZES),
    "meshes": (run_meshes, (4,)),
}


@pytest.fixture(scope="module", params=WORLD_SIZES, ids=lambda w: f"{w}ranks")
def ranks(request, tmp_path_factory) -> list[dict]:
    out_dir = tmp_path_factory.mktemp(f"world{request.param}")
    return spawn(request.param, out_dir, __name__)


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.view(-1).view(torch.uint8), b.view(-1).view(torch.uint8))


def test_planned_dtensor_statistics_are_the_functional_ones(ranks):
    for rank, result in enumerate(ranks):
        for step, record in enumerate(result["fsdp2_plan"]["steps"]):
            for p in NORM_TYPES:
                planned, functional = record[str(p)]["planned"], record[str(p)]["functional"]
                for a, b in zip(planned, functional):
                    assert same(a, b), (rank, step, p)


def test_planned_norm_is_the_global_norm_as_a_plain_tensor(ranks):
    for record in ranks[0]["fsdp2_plan"]["steps"]:
        assert record["norm_type"] == "Tensor"  # not a DTensor (torch returns a partial one)
        want = torch.linalg.vector_norm(torch.cat([g.reshape(-1) for g in record["before"]]))
        if math.isfinite(want):
            assert float(record["norm"]) == pytest.approx(float(want), rel=1e-6)
        else:
            assert math.isnan(float(record["norm"]))
    first_norms = {float(r["fsdp2_plan"]["steps"][0]["norm"]) for r in ranks}
    assert len(first_norms) == 1  # identical on every rank


def test_planned_clip_scales_every_shard_and_skips_the_nan_step_on_all_ranks(ranks):
    for rank, result in enumerate(ranks):
        for step, record in enumerate(result["fsdp2_plan"]["steps"]):
            before, after = record["before"], record["after"]
            if step == NAN_STEP:  # a NaN on the last rank: every rank leaves its shards alone
                assert all(same(a, b) for a, b in zip(before, after)), rank
                continue
            coef = MAX_NORM / (float(record["norm"]) + 1e-6)
            for a, b in zip(before, after):
                torch.testing.assert_close(b, a * coef, rtol=1e-6, atol=0)


def test_the_planned_path_reads_no_gradient_through_the_functional_path(ranks):
    for result in ranks:
        for record in result["fsdp2_plan"]["steps"]:
            assert record["functional_passes"] == 0
            assert record["functional_passes_control"] >= 1  # the count sees the functional path


def test_the_plan_is_kept_across_set_to_none(ranks):
    assert [r["fsdp2_plan"]["builds"] for r in ranks] == [1] * len(ranks)
    assert [r["optimizer"]["builds"] for r in ranks] == [1] * len(ranks)


def test_clip_grad_optimizer_over_fsdp2_skips_the_nan_step_everywhere(ranks):
    norms = [r["optimizer"]["norms"] for r in ranks]
    assert all(same(n, norms[0]) for n in norms)
    assert [int(r["optimizer"]["skipped"]) for r in ranks] == [1] * len(ranks)
    assert math.isnan(float(norms[0][NAN_STEP]))
    first = ranks[0]["optimizer"]["weights"]
    for r in ranks[1:]:
        assert all(same(a, b) for a, b in zip(r["optimizer"]["weights"], first))


def test_two_meshes_a_partial_and_a_plain_gradient_give_one_norm(ranks):
    if len(ranks) != 4:
        pytest.skip("the 2-D mesh needs 4 ranks")
    gen = torch.Generator().manual_seed(SEED)
    wholes = [torch.randn(8, 3, generator=gen), torch.randn(6, 4, generator=gen)]
    wholes += [torch.randn(5, generator=gen), torch.randn(4, 2, generator=gen)]
    sharded = torch.linalg.vector_norm(torch.cat([w.reshape(-1) for w in wholes[:3]]))
    everything = torch.linalg.vector_norm(torch.cat([w.reshape(-1) for w in wholes]))
    for result in ranks:
        assert float(result["meshes"]["sharded"]) == pytest.approx(float(sharded), rel=1e-6)
        assert float(result["meshes"]["with_partial"]) == pytest.approx(float(everything), rel=1e-6)
