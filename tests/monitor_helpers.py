"""Shared helpers of the GradMonitor tests: small models, constant gradients, diagnosis checks, the
examples, and guards that catch any copy of a tensor value to the host."""

from __future__ import annotations

import contextlib
import importlib.util
import math
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

import gradstats
from gradstats import GradMonitor
from gradstats.bench.reads import replaced_host_reads

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
NAN = float("nan")
# Relative tolerance of numbers read back from the float64 ring buffers against the test's own.
RTOL = 1e-6


def small_mlp(device: str = "cpu") -> nn.Sequential:
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)).to(device)


def set_grads(model: nn.Module, norms: dict[str, float] | float) -> None:
    """Gives every parameter a constant gradient whose L2 norm is norms[name] (or norms)."""
    for name, p in model.named_parameters():
        norm = norms[name] if isinstance(norms, dict) else norms
        p.grad = torch.full_like(p, norm / math.sqrt(p.numel()))


def causes(findings: list[gradstats.Finding]) -> dict[str, int]:
    return {f.cause: f.step for f in findings}


def assert_diagnosis(findings: list[gradstats.Finding], expected: dict[str, int]) -> None:
    """The findings are exactly the expected causes, each first seen at the expected step."""
    got = causes(findings)
    assert got == expected, "diagnosis differs:\n" + "\n".join(map(str, findings))


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def host_reads_forbidden() -> Iterator[None]:
    """Any copy of a tensor value to the host raises while this is active."""

    def forbidden(name, method):
        def read(self, *args, **kwargs):
            raise AssertionError(f"Tensor.{name}() read a value back to the host")

        return read

    with replaced_host_reads(forbidden):
        yield


def train_regression(
    model: nn.Module,
    monitor: GradMonitor,
    steps: int,
    device: str = "cpu",
    corrupt: dict[int, str] | None = None,
) -> None:
    """Adam on a linear target; corrupt[step] = "nan" or "huge" spoils that step's batch."""
    corrupt = corrupt or {}
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    weights = torch.randn(4, 2, device=device)
    for step in range(steps):
        x = torch.randn(16, 4, device=device)
        y = x @ weights
        if corrupt.get(step) == "nan":
            x[3, 1] = NAN
        elif corrupt.get(step) == "huge":
            x[:, 0] *= 1e7
        loss = nn.functional.mse_loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        monitor.step()
        optimizer.step()


def exploding_run(device: str, jump_step: int = 20, jump: float = 4.4e16) -> GradMonitor:
    model = small_mlp(device)
    monitor = GradMonitor(model)
    for step in range(jump_step + 5):
        healthy = {
            name: 1.0 + 0.1 * math.sin(step + i)
            for i, (name, _) in enumerate(model.named_parameters())
        }
        if step == jump_step:
            healthy["2.weight"] = jump
        set_grads(model, healthy)
        monitor.step()
    return monitor
