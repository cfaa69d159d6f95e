"""The examples as a user runs them: a --device that cannot run stops with a clear message (the
bench's check), never an AssertionError from inside torch."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from helpers import child_env
from monitor_helpers import EXAMPLES

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
