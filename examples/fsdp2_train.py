"""Train a small MLP with FSDP2 (fully_shard) and gradstats.ClipGradOptimizer, under torchrun.

    torchrun --nproc_per_node 2 examples/fsdp2_train.py                  # CPU processes, gloo
    torchrun --nproc_per_node 8 examples/fsdp2_train.py --device cuda    # one GPU each, NCCL
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv-backend c10d \\
        --rdzv-endpoint HOST:29500 examples/fsdp2_train.py --device cuda # two machines

The gradients are DTensors sharded over the ranks. ClipGradOptimizer sees that by itself and
combines the statistics of the local shards in one all-reduce over the mesh: every rank gets the
global norm and clips by the same coefficient, and the fused AdamW takes that coefficient and the
skip flag on the device, with no host sync. One step's batch holds a NaN on the last rank only:
the step is skipped on every rank, and training carries on. Needs torch >= 2.6 (FSDP2).
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

import gradstats
from gradstats.bench import pick_device

FEATURES, HIDDEN, BATCH = 32, 64, 64
SEED = 0


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--max-norm", type=float, default=1.0)
    parser.add_argument("--nan-step", type=int, default=10, help="the step with a NaN input")
    parser.add_argument("--log-every", type=int, default=5, help="stats_dict() syncs: not often")
    parser.add_argument("--lr", type=float, default=3e-3)
    return parser.parse_args()


def setup(device_type: str) -> torch.device:
    """One process per device, started by torchrun (which sets RANK, WORLD_SIZE, LOCAL_RANK...)."""
    pick_device(device_type)  # a clear stop for a device that cannot run, as the bench
    if device_type == "cuda":
        local_rank = int(os.environ["LOCAL_RANK"])
        torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl", device_id=torch.device("cuda", local_rank))
        return torch.device("cuda", local_rank)
    dist.init_process_group("gloo")
    return torch.device("cpu")


def main() -> None:
    args = parse_args()
    device = setup(args.device)
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh(device.type, (world,))

    torch.manual_seed(SEED)  # the same initial weights and teacher on every rank
    teacher = nn.Linear(FEATURES, 1).to(device)
    model = nn.Sequential(
        nn.Linear(FEATURES, HIDDEN), nn.GELU(), nn.Linear(HIDDEN, HIDDEN), nn.GELU(),
        nn.Linear(HIDDEN, 1),
    ).to(device)  # fmt: skip
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)

    # As on one device: no process_group, since the DTensor gradients say how they are sharded.
    inner = torch.optim.AdamW(model.parameters(), lr=args.lr, fused=True)
    opt = gradstats.ClipGradOptimizer(inner, max_norm=args.max_norm, on_nonfinite="skip")

    data = torch.Generator(device=device).manual_seed(SEED + 1 + rank)  # each rank its own batches
    if rank == 0:
        print(f"{world} ranks on {device.type}, {dist.get_backend()}")
        print(f"{'step':>4} {'loss':>10} {'grad norm':>10} {'coef':>6}  skipped")
    for step in range(args.steps):
        x = torch.randn(BATCH, FEATURES, device=device, generator=data)
        y = teacher(x).detach() ** 2
        if step == args.nan_step and rank == world - 1:
            x[0, 0] = float("nan")  # a corrupt sample on one rank
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        if step % args.log_every == 0 or step == args.nan_step:
            stats = opt.stats_dict()  # the same on every rank
            if rank == 0:
                print(
                    f"{step:4d} {loss.item():10.4f} {stats['total_norm']:10.4f} "
                    f"{stats['clip_coef']:6.3f}  {stats['skipped_steps']}"
                )

    # Every rank took the same decisions: compare the last norms and skip counts across ranks.
    mine = torch.stack([opt.last_stats.total_norm.double(), opt.skipped_steps.double()])
    lowest, highest = mine.clone(), mine.clone()
    dist.all_reduce(lowest, op=dist.ReduceOp.MIN)
    dist.all_reduce(highest, op=dist.ReduceOp.MAX)
    if not torch.equal(lowest, highest):
        raise RuntimeError(f"ranks disagree: {lowest.tolist()} vs {highest.tolist()}")
    if rank == 0:
        print(f"done: {int(opt.skipped_steps)} skipped step(s), the same on all {world} ranks")
    dist.barrier()  # no rank tears down its connections while another still uses them
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
