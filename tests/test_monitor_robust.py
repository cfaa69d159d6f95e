"""GradMonitor never makes the user's forward, backward or step fail, says what it could not watch,
and keeps its memory bounded by its window whatever runs between two steps."""

from __future__ import annotations

import collections
import dataclasses
import tracemalloc

import numpy as np
import torch
from monitor_helpers import NAN, causes, set_grads, small_mlp
from torch import nn

from gradstats import GradMonitor

# Forwards without step() in the memory tests: the second run does ten times the first.
FORWARDS = 300
# Python memory the monitor may allocate over FORWARDS * 9 more forwards (caches, interning): far
# below the kilobytes per forward that a log of calls would take.
PYTHON_SLACK_BYTES = 64 * 1024


class SparseInput(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, 2))

    def forward(self, x):
        return torch.sparse.mm(x, self.weight)


def test_sparse_inputs_are_read_through_their_values():
    for layout in ("coo", "csr"):
        model = SparseInput()
        monitor = GradMonitor(model)
        dense = torch.randn(3, 4)
        dense[1, 2] = NAN
        x = dense.to_sparse() if layout == "coo" else dense.to_sparse_csr()
        model(x).sum().backward()  # raised "layout Sparse" before
        monitor.step()
        h = monitor.history()
        assert h.sites == ("input[0]",)
        assert h.site_nan[0, 0] == 1
        assert h.site_max_abs[0, 0] == np.nanmax(np.abs(dense.numpy()))
        assert causes(monitor.diagnose())["bad_input"] == 0
        assert h.unwatched == ()


def test_nested_inputs_are_read_through_their_values():
    for layout in (torch.jagged, torch.strided):
        model = nn.Linear(4, 2)
        monitor = GradMonitor(model, watch_modules="all")
        parts = [torch.randn(2, 4), torch.randn(3, 4) * 5]
        parts[1][2, 3] = NAN
        with torch.no_grad():
            model(torch.nested.nested_tensor(parts, layout=layout))  # raised before
        h = monitor.history()
        assert h.site_nan[0, h.sites.index("input[0]")] == 1
        expected = max(float(np.nanmax(np.abs(p.numpy()))) for p in parts)
        assert h.site_max_abs[0, h.sites.index("input[0]")] == np.float32(expected)
        assert causes(monitor.diagnose()) == {"bad_input": 0}


class Float8Input(nn.Module):
    """Takes a float8 tensor, which the fused op does not read: its hook call fails inside."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 2)

    def forward(self, x):
        return self.linear(x.float())


def test_an_error_inside_a_hook_is_reported_not_raised():
    model = Float8Input()
    monitor = GradMonitor(model)
    x = torch.randn(3, 4).to(torch.float8_e4m3fn)
    for _ in range(3):
        model(x).sum().backward()  # the hook's RuntimeError does not reach the user
        monitor.step()
    assert monitor.num_steps == 3
    (line,) = monitor.history().unwatched
    assert line.startswith("input: the monitor's hook failed (RuntimeError: gradstats.stats:")
    assert "Float8_e4m3fn" in line and line.endswith("(3 times)")
    report = monitor.report()
    assert "Not watched (the rest was):" in report
    assert report.count("hook failed") == 1  # said once, with the count
    assert "No problem found" in report


def test_what_cannot_be_read_is_named_once():
    class MetaOutput(nn.Module):
        def forward(self, x):
            return x.new_empty(x.shape, device="meta")

    model = nn.Sequential(nn.Linear(4, 4), MetaOutput())
    monitor = GradMonitor(model, watch_modules="all")
    for _ in range(2):
        model(torch.randn(2, 4))
    assert monitor.history().unwatched == (
        "1: not watched: a meta tensor holds no values (2 times)",
    )
    assert "1: not watched: a meta tensor" in monitor.report()


@dataclasses.dataclass
class Batch:
    features: torch.Tensor
    extra: dict


Pair = collections.namedtuple("Pair", ["left", "right"])


class Opaque:
    """A batch class the monitor cannot look into."""

    def __init__(self, features):
        self.features = features


class ReadsFeatures(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 1)

    def forward(self, batch, *, flag=None, name="", count=0):
        if isinstance(batch, Pair):
            return self.linear(batch.left + batch.right)
        return self.linear(batch.features)


def test_dataclass_and_namedtuple_batches_are_read_by_field():
    model = ReadsFeatures()
    monitor = GradMonitor(model)
    x = torch.randn(3, 4)
    x[1, 2] = NAN
    model(Batch(x, {"pair": Pair(torch.ones(3, 4), torch.zeros(3, 4))})).sum().backward()
    monitor.step()
    model(Pair(torch.randn(3, 4), torch.randn(3, 4)), flag=True, name="b", count=2)
    h = monitor.history()
    assert h.sites == (
        "input[0][features]",
        "input[0][extra][pair][left]",
        "input[0][extra][pair][right]",
        "input[0][left]",
        "input[0][right]",
    )
    bad = [f for f in monitor.diagnose() if f.cause == "bad_input"]
    assert [(f.step, f.where) for f in bad] == [(0, ("input[0][features]",))]
    assert h.unwatched == ()  # None, bool, str and int arguments hold no values to watch


def test_an_unread_batch_is_named_not_watched():
    """NaN inside an object the monitor cannot read: the report says the input was not watched,
    rather than nothing (and then blaming the gradients alone)."""
    model = ReadsFeatures()
    monitor = GradMonitor(model)
    x = torch.randn(3, 4)
    x[0, 0] = NAN
    for _ in range(2):
        model(Opaque(x)).sum().backward()
        monitor.step()
    (line,) = monitor.history().unwatched
    assert line.startswith("input[0]: not watched: type Opaque is not read (")
    assert line.endswith("(2 times)")
    assert "Not watched (the rest was):" in monitor.report()


def test_healthy_runs_have_nothing_unwatched():
    """The negative: the notes above come from those inputs, not from every run."""
    model = small_mlp()
    monitor = GradMonitor(model, watch_modules="all")
    model(torch.randn(2, 4)).sum().backward()
    monitor.step()
    assert monitor.history().unwatched == ()
    assert "Not watched" not in monitor.report()


def test_sparse_gradients_are_watched():
    model = nn.Embedding(10, 3, sparse=True)
    monitor = GradMonitor(model, watch_inputs=False)
    ids = torch.tensor([1, 1, 4])
    model(ids).sum().backward()
    monitor.step()
    expected = model.weight.grad.coalesce().to_dense().norm().item()
    assert monitor.scalars()["gradstats/total_norm"] == np.float32(expected)


def deep_mlp(layers: int = 10) -> nn.Sequential:
    return nn.Sequential(*[nn.Linear(8, 8) for _ in range(layers)])


def evaluate(model: nn.Module, forwards: int) -> None:
    with torch.no_grad():
        for _ in range(forwards):
            model(torch.randn(2, 8))


def test_many_forwards_without_step_keep_memory_bounded():
    """An evaluation loop (forwards, no step()) grew a per-step log of calls without bound."""
    model = deep_mlp()
    monitor = GradMonitor(model, window=8, watch_modules="all")
    model(torch.randn(2, 8)).sum().backward()
    monitor.step()
    evaluate(model, FORWARDS)
    after_some = monitor.memory_bytes
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        evaluate(model, 9 * FORWARDS)
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert monitor.memory_bytes == after_some
    assert grown < PYTHON_SLACK_BYTES, f"Python memory grew by {grown} bytes"
    # The buffers: window rows of (parameters + 11 sites) columns and latches, a few KiB each.
    assert monitor.memory_bytes < 8 * 1024 * monitor.window


def test_forwards_without_step_still_name_the_first_module_with_nan():
    """Bounding the memory keeps the forward order: the first module to produce NaN in the 1000th
    forward since the last step is named."""
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4))
    monitor = GradMonitor(model, window=4, watch_modules="all")
    evaluate_4 = [torch.randn(2, 4) for _ in range(3)]
    with torch.no_grad():
        for i in range(1000):
            model(evaluate_4[i % 3])
        model[1].weight[0, 0] = NAN
        model(evaluate_4[0])
    (finding,) = monitor.diagnose()
    assert (finding.cause, finding.where, finding.step) == ("nonfinite_activations", ("1",), 0)
    assert "then module 2 (Linear)" in finding.message


def test_memory_check_can_fail():
    """The measure above sees growth: more sites mean more bytes."""
    model = deep_mlp()
    monitor = GradMonitor(model, window=8, watch_modules="all")
    set_grads(model, 1.0)
    monitor.step()
    model[:3](torch.randn(2, 8))
    few = monitor.memory_bytes
    model(torch.randn(2, 8))
    assert monitor.memory_bytes > few
