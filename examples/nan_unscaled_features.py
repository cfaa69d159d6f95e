"""Bad input data, per feature: the forgotten scaler, and one outlier row.

A small regression network trains on raw tabular features of very different scales (a ratio in the
thousandths, ages in tens, a population in tens of thousands): the classic forgotten
StandardScaler. Training is erratic but nothing turns NaN, so nothing in the training loop says why;
the monitor's per-feature input statistics do, naming the features and the numbers to scale with.
With --outlier the features are standardised but one row at step 30 holds a value typed in the
wrong unit; with --scaled everything is standardised and the report finds nothing.

    python examples/nan_unscaled_features.py [--outlier | --scaled] [--plot features.png]

--plot draws what the monitor found: each input feature's RMS and largest |x| per step (and, next
to it as features-gradients.png, the monitor's own plot of the gradients).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from torch import nn

import gradstats

STEPS = 60
BATCH = 32
LR = 1e-3
SEED = 0
# (mean, standard deviation) of each raw feature: a ratio, an age, rooms, a population, a latitude.
FEATURES = ((0.004, 0.001), (29.0, 12.0), (5.4, 2.5), (1425.0, 1130.0), (35.6, 2.1))
# --outlier: this step's batch holds one row whose population was entered in the wrong unit.
OUTLIER_STEP = 30
OUTLIER_ROW = 11
OUTLIER_FEATURE = 3
OUTLIER_VALUE = 1.4e7
FEATURE_NAMES = ("ratio", "age", "rooms", "population", "latitude")
PLOT_SIZE_IN = (9.0, 6.0)
PLOT_DPI = 120


def batch(weights: torch.Tensor, raw: bool) -> tuple[torch.Tensor, torch.Tensor]:
    z = torch.randn(BATCH, len(FEATURES))
    y = z @ weights
    if not raw:
        return z, y
    mean = torch.tensor([m for m, _ in FEATURES])
    std = torch.tensor([s for _, s in FEATURES])
    return z * std + mean, y


def train(mode: str = "unscaled", steps: int = STEPS) -> gradstats.GradMonitor:
    """mode: "unscaled" (raw features), "outlier" (standardised, one bad row) or "scaled"."""
    torch.manual_seed(SEED)
    model = nn.Sequential(nn.Linear(len(FEATURES), 32), nn.ReLU(), nn.Linear(32, 1))
    monitor = gradstats.GradMonitor(model, watch_modules="all")
    optimizer = torch.optim.Adam(model.parameters(), lr=LR)
    weights = torch.randn(len(FEATURES), 1)
    for step in range(steps):
        x, y = batch(weights, raw=mode == "unscaled")
        if mode == "outlier" and step == OUTLIER_STEP:
            x[OUTLIER_ROW, OUTLIER_FEATURE] = OUTLIER_VALUE
        loss = nn.functional.mse_loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        monitor.step()
        optimizer.step()
    monitor.close()
    return monitor


def feature_figure(monitor: gradstats.GradMonitor, mode: str):
    """The per-feature input statistics the monitor kept: each feature's RMS and largest |x|, per
    step, on log axes (a standardised feature sits near 1; unscaled ones spread over decades)."""
    from matplotlib.figure import Figure

    history = monitor.history()
    (features,) = history.features  # the model's one input
    steps = history.site_steps
    largest = np.fmax(np.abs(features.low), np.abs(features.high))
    fig = Figure(figsize=PLOT_SIZE_IN, layout="constrained")
    rms_axes, max_axes = fig.subplots(2, 1, sharex=True)
    for j in range(features.num_features):
        label = f"{j}: {FEATURE_NAMES[j]}"
        rms_axes.semilogy(steps, features.rms[:, j], marker=".", linewidth=1, label=label)
        max_axes.semilogy(steps, largest[:, j], marker=".", linewidth=1, label=label)
    for finding in monitor.diagnose():  # the steps of the findings the report gives
        for axes in (rms_axes, max_axes):
            axes.axvline(finding.step, color="grey", linestyle=":", linewidth=1)
    rms_axes.set_ylabel("RMS per step")
    max_axes.set_ylabel("largest |x| per step")
    max_axes.set_xlabel("step (dotted: a finding)")
    handles, labels = rms_axes.get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=len(labels), fontsize="small")
    fig.suptitle(f"Input features ({mode}): per-feature statistics of {features.site}")
    return fig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--outlier", action="store_true", help="standardised, one outlier row")
    group.add_argument("--scaled", action="store_true", help="standardised: the fixed run")
    parser.add_argument("--plot", metavar="PNG", help="also write the monitor's plot here")
    args = parser.parse_args()
    mode = "outlier" if args.outlier else "scaled" if args.scaled else "unscaled"
    monitor = train(mode)
    print(monitor.report())
    if args.plot:
        path = Path(args.plot)
        feature_figure(monitor, mode).savefig(path, dpi=PLOT_DPI)
        gradients = path.with_name(f"{path.stem}-gradients{path.suffix}")
        monitor.plot(gradients, title=f"Per-parameter gradient norm ({mode} input features)")
        print(f"plot: {path} (input features); {gradients} (gradients)")


if __name__ == "__main__":
    main()
