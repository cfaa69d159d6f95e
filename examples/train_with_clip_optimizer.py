"""Train a small regression model with gradstats.ClipGradOptimizer.

    python examples/train_with_clip_optimizer.py                 # CPU, fixed max_norm
    python examples/train_with_clip_optimizer.py --adaptive      # z-score adaptive clipping
    python examples/train_with_clip_optimizer.py --device cuda

One batch is poisoned with a NaN input to show a skipped step: the weights, the optimizer state and
its step counters stay as they were, and training carries on.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

import gradstats
from gradstats.bench import pick_device

FEATURES, HIDDEN, BATCH = 32, 64, 128
TEACHER_SEED = 0


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:1, ...")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--max-norm", type=float, default=1.0)
    parser.add_argument("--nan-step", type=int, default=12, help="the step whose batch holds a NaN")
    parser.add_argument("--adaptive", action="store_true", help="AdaptiveClip instead of max_norm")
    parser.add_argument("--lr", type=float, default=3e-3)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    device = pick_device(args.device)  # a clear stop for a device that cannot run, as the bench
    torch.manual_seed(TEACHER_SEED)
    teacher = nn.Linear(FEATURES, 1).to(device)
    model = nn.Sequential(nn.Linear(FEATURES, HIDDEN), nn.GELU(), nn.Linear(HIDDEN, 1)).to(device)

    # The two-line change from clip_grad_norm_ + step(): wrap the optimizer, drop the clip call.
    # A fused optimizer takes the clip as its grad_scale, so neither clipping nor a skip syncs.
    inner = torch.optim.AdamW(model.named_parameters(), lr=args.lr, fused=True)
    max_norm = gradstats.AdaptiveClip(warmup_steps=10) if args.adaptive else args.max_norm
    opt = gradstats.ClipGradOptimizer(inner, max_norm=max_norm, on_nonfinite="skip")
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.steps)

    print(f"{'step':>4} {'loss':>10} {'grad norm':>10} {'max_norm':>9} {'coef':>6}  note")
    for step in range(args.steps):
        x = torch.randn(BATCH, FEATURES, device=device)
        y = teacher(x).detach() ** 2
        if step == args.nan_step:
            x[0, 0] = float("nan")  # a corrupt sample: every gradient becomes NaN
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        sched.step()
        # stats_dict() copies to the host: log every N steps in real training.
        logged = opt.stats_dict()
        note = "skipped (NaN gradients)" if logged["skipped"] else ""
        if not logged["skipped"] and logged["clip_coef"] < 1:
            note = "clipped"
        print(
            f"{step:>4} {loss.item():>10.4f} {logged['total_norm']:>10.4f} "
            f"{logged['max_norm']:>9.3g} {logged['clip_coef']:>6.3f}  {note}"
        )
    print(f"skipped steps: {int(opt.skipped_steps)} of {args.steps}")
    print(f"AdamW step counter: {int(inner.state[model[0].weight]['step'])}")


if __name__ == "__main__":
    main()
