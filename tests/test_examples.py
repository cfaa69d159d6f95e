"""The examples as a user runs them: a --device that cannot run stops with a clear message (the
bench's check), never an AssertionError from inside torch."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers import child_env
from monitor_helpers import EXAMPLES, load_example

from gradstats.bench import pick_device

SUBPROCESS_TIMEOUT_S = 120
# Every example that takes a --device: found from their sources, so a new one is checked too.
WITH_DEVICE = sorted(p.name for p in EXAMPLES.glob("*.py") if '"--device"' in p.read_text())


def test_the_examples_with_a_device_are_found():
    assert {"train_with_clip_optimizer.py", "fsdp2_train.py"} <= set(WITH_DEVICE)


@pytest.mark.parametrize("example", WITH_DEVICE)
def test_an_example_without_a_gpu_says_so(example):
    """--device cuda with no CUDA device visible (hidden where there is one)."""
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / example), "--device", "cuda"],
        capture_output=True,
        text=True,
        env={**child_env(), "CUDA_VISIBLE_DEVICES": ""},
        timeout=SUBPROCESS_TIMEOUT_S,
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr, result.stderr
    assert "--device cuda: no CUDA device is visible to torch" in result.stderr


@pytest.mark.parametrize(
    ("device", "says"),
    [
        ("cuda:1", "no CUDA device is visible to torch"),
        ("mps", "gradstats has kernels for cpu and cuda only"),
        ("gpu", "not a device; use cpu, cuda or cuda:N"),
    ],
)
def test_the_device_check_says_what_is_wrong(monkeypatch, device, says):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match=f"--device {device}: {says}"):
        pick_device(device)
    assert pick_device("cpu") == torch.device("cpu")
    assert pick_device(None) == torch.device("cpu")


def test_the_unscaled_features_plot_shows_the_features():
    """Its title says "Input features": it plots each feature's statistics, one line per feature
    in each panel, at the scales the monitor saw (not a gradient heatmap)."""
    pytest.importorskip("matplotlib")
    example = load_example("nan_unscaled_features")
    fig = example.feature_figure(example.train("unscaled"), "unscaled")
    rms, largest = fig.axes

    def feature_lines(axes):  # the labelled lines (not the findings' markers)
        return [line for line in axes.get_lines() if not line.get_label().startswith("_")]

    assert fig.get_suptitle().startswith("Input features (unscaled): per-feature statistics")
    features = len(example.FEATURES)
    assert len(feature_lines(rms)) == len(feature_lines(largest)) == features
    typical = [float(np.nanmedian(line.get_ydata())) for line in feature_lines(rms)]
    population = example.FEATURES[example.OUTLIER_FEATURE]
    assert typical[example.OUTLIER_FEATURE] == pytest.approx(math.hypot(*population), rel=0.2)
    assert [t.get_text() for t in fig.legends[0].get_texts()] == [
        f"{j}: {name}" for j, name in enumerate(example.FEATURE_NAMES)
    ]
