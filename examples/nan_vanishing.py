"""Vanishing gradients: a deep sigmoid network whose early layers stop learning.

Twelve sigmoid layers with PyTorch's default initialisation: each layer scales the backward signal
by about 0.1 (the sigmoid's slope is at most 0.25), so the first layers get gradients ten orders of
magnitude smaller than the last one and do not learn. --fixed trains the same depth with ReLU and
He initialisation, which the report recommends, and finds nothing.

    python examples/nan_vanishing.py [--fixed] [--plot vanishing.png]
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

import gradstats

STEPS = 40
DEPTH = 12
WIDTH = 32
FEATURES = 8
BATCH = 64
LR = 0.1
SEED = 0


def make_model(fixed: bool) -> nn.Sequential:
    layers: list[nn.Module] = []
    width_in = FEATURES
    for _ in range(DEPTH):
        linear = nn.Linear(width_in, WIDTH)
        if fixed:
            nn.init.kaiming_normal_(linear.weight, nonlinearity="relu")
            nn.init.zeros_(linear.bias)
        layers += [linear, nn.ReLU() if fixed else nn.Sigmoid()]
        width_in = WIDTH
    layers.append(nn.Linear(width_in, 1))
    return nn.Sequential(*layers)


def train(steps: int = STEPS, fixed: bool = False) -> gradstats.GradMonitor:
    torch.manual_seed(SEED)
    model = make_model(fixed)
    monitor = gradstats.GradMonitor(model)
    # ReLU layers with He initialisation keep the signal's scale; a smaller step keeps them stable.
    optimizer = torch.optim.SGD(model.parameters(), lr=LR / 10 if fixed else LR)
    direction = torch.randn(FEATURES, 1)
    for _ in range(steps):
        x = torch.randn(BATCH, FEATURES)
        target = (x @ direction > 0).float()
        loss = nn.functional.binary_cross_entropy_with_logits(model(x), target)
        optimizer.zero_grad()
        loss.backward()
        monitor.step()
        optimizer.step()
    monitor.close()
    return monitor


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fixed", action="store_true", help="ReLU and He initialisation instead")
    parser.add_argument("--plot", metavar="PNG", help="also write the monitor's plot here")
    args = parser.parse_args()
    monitor = train(fixed=args.fixed)
    print(monitor.report())
    if args.plot:
        title = "ReLU + He init" if args.fixed else "Vanishing gradients (12 sigmoid layers)"
        print(f"plot: {monitor.plot(args.plot, title=title)}")


if __name__ == "__main__":
    main()
