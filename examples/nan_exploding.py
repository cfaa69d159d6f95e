"""Exploding gradients: a ReLU RNN whose learning rate warms up too far.

An IRNN (ReLU recurrence, identity-initialised recurrent weights) learns to sum a sequence with SGD.
The learning rate warms up towards 0.05; after 30 healthy steps the recurrent weights pass the point
where the backward pass through 30 time steps amplifies the gradient, the total gradient norm jumps
by seven orders of magnitude, and the next update turns the weights into NaN.

    python examples/nan_exploding.py [--plot exploding.png]
"""

from __future__ import annotations

import argparse
import math

import torch
from torch import nn

import gradstats

STEPS = 60
SEQ_LEN = 30
BATCH = 16
FEATURES = 4
HIDDEN = 32
PEAK_LR = 0.05
WARMUP_STEPS = 50
SEED = 1


class SumRNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.RNN(FEATURES, HIDDEN, nonlinearity="relu", batch_first=True)
        self.head = nn.Linear(HIDDEN, 1)
        with torch.no_grad():
            self.rnn.weight_hh_l0.copy_(torch.eye(HIDDEN))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


def train(steps: int = STEPS) -> gradstats.GradMonitor:
    torch.manual_seed(SEED)
    model = SumRNN()
    monitor = gradstats.GradMonitor(model, watch_modules="all")
    optimizer = torch.optim.SGD(model.parameters(), lr=PEAK_LR)
    warmup = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / WARMUP_STEPS)
    )
    for _ in range(steps):
        x = torch.randn(BATCH, SEQ_LEN, FEATURES)
        target = x.sum(dim=(1, 2)).unsqueeze(1) / math.sqrt(SEQ_LEN)
        loss = nn.functional.mse_loss(model(x), target)
        optimizer.zero_grad()
        loss.backward()
        monitor.step()
        optimizer.step()
        warmup.step()
    monitor.close()
    return monitor


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plot", metavar="PNG", help="also write the monitor's plot here")
    args = parser.parse_args()
    monitor = train()
    print(monitor.report())
    if args.plot:
        print(f"plot: {monitor.plot(args.plot, title='Exploding gradients (ReLU RNN)')}")


if __name__ == "__main__":
    main()
