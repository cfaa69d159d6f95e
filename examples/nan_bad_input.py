"""Bad input data: a batch with an unscaled feature, then one with a missing value.

A small regression network trains on standardised tabular features. At step 15 a batch arrives in
which one feature was not scaled (values in the millions); at step 25 a batch holds a missing value
(NaN). Nothing in the training loop guards against either, so the NaN reaches the weights and every
later step is NaN. The monitor names the input, the step and the kind of problem before that.

    python examples/nan_bad_input.py [--plot bad_input.png]
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

import gradstats

STEPS = 40
FEATURES = 6
BATCH = 32
LR = 1e-2
UNSCALED_STEP = 15
UNSCALED_VALUE = 3.0e6
MISSING_STEP = 25
SEED = 0


def batch(step: int, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(BATCH, FEATURES)
    y = x @ weights
    if step == UNSCALED_STEP:
        x[:, 2] = x[:, 2].abs() * UNSCALED_VALUE
    if step == MISSING_STEP:
        x[7, 4] = float("nan")
    return x, y


def train(steps: int = STEPS) -> gradstats.GradMonitor:
    torch.manual_seed(SEED)
    model = nn.Sequential(nn.Linear(FEATURES, 32), nn.Tanh(), nn.Linear(32, 1))
    monitor = gradstats.GradMonitor(model, watch_modules="all")
    optimizer = torch.optim.Adam(model.parameters(), lr=LR)
    weights = torch.randn(FEATURES, 1)
    for step in range(steps):
        x, y = batch(step, weights)
        loss = nn.functional.mse_loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        monitor.step()
        optimizer.step()
    monitor.close()
    return monitor


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plot", metavar="PNG", help="also write the monitor's plot here")
    args = parser.parse_args()
    monitor = train()
    print(monitor.report())
    if args.plot:
        print(f"plot: {monitor.plot(args.plot, title='Bad input data')}")


if __name__ == "__main__":
    main()
