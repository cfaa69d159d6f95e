"""The benchmark's host-overhead scenario and its GradPlan sides: smoke runs and synthetic results;
nothing here asserts a timing."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math

import pytest
import torch
from bench_helpers import (  # noqa: F401  (scratch_folder: autouse)
    QUICK,
    bench_row,
    load_script,
    scratch_folder,
    write_results,
)

import gradstats
from gradstats import bench
from gradstats.bench import cli, host, report
from gradstats.bench.cases import HOST_OVERHEAD

HOST_FIELDS = (
    *(f"{side}_{what}" for side in report.HOST_SIDES for what in ("us", "ns_per_tensor")),
    "speedup",
    "planned_speedup",
    "budget_us",
    "within_budget",
    "planned_builds",
    "torch_norm_error",
    "other_cpu_share",
    "busy",
)
TARGET = host.BUDGET_TARGET_TENSORS
BUDGET_US = host.planned_budget_us(TARGET)


def test_host_overhead_is_in_the_default_run():
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    config = cli.make_config(parser.parse_args(["--device", "cpu"]))
    assert HOST_OVERHEAD in config.scenarios
    assert config.host_counts == host.HOST_COUNTS == (100, 2_000, 10_000)


def test_planned_budget_is_50_us_plus_30_ns_per_tensor():
    assert host.planned_budget_us(0) == 50.0
    assert host.planned_budget_us(10_000) == pytest.approx(350.0)


def test_host_overhead_scenario_writes_its_rows(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert bench.main([*QUICK, "--scenario", HOST_OVERHEAD, "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    payload = json.loads(out.read_text())
    header, rows = payload["header"], payload["rows"]
    assert "host_summary" in header["method"] and "summary" not in header["method"]
    assert header["method"]["host_counts"] == list(host.QUICK_HOST_COUNTS)
    expected = [(n, v) for n in host.QUICK_HOST_COUNTS for v in host.VARIANTS]
    assert [(r["tensors"], r["variant"]) for r in rows] == expected  # no preset's rows
    for row in rows:
        missing = [key for key in HOST_FIELDS if key not in row]
        assert not missing, f"row lacks {missing}"
        assert (row["scenario"], row["dtype"], row["device"]) == (HOST_OVERHEAD, "float32", "cpu")
        n = row["tensors"]
        assert row["elements"] == n
        for side in report.HOST_SIDES:
            assert row[f"{side}_us"] > 0
            ns = row[f"{side}_us"] * host.NS_PER_US / n
            assert row[f"{side}_ns_per_tensor"] == pytest.approx(ns)
        assert row["speedup"] == pytest.approx(row["torch_us"] / row["gradstats_us"])
        assert row["planned_speedup"] == pytest.approx(row["torch_us"] / row["planned_us"])
        assert row["budget_us"] == pytest.approx(host.planned_budget_us(n))
        assert row["within_budget"] == (row["planned_us"] <= row["budget_us"])
        assert row["planned_builds"] == 1  # every timed call used its plan
    assert "| tensors | case | torch us | gradstats us | planned us |" in printed
    assert "| 2,000 | clip that clips |" in printed
    assert "| preset | dtype | scenario |" not in printed  # no bandwidth table without its rows


def _host_row(tensors: int, variant: str, planned_us: float, **extra) -> dict:
    """A host-overhead row as the benchmark writes it, with made-up times."""
    times = {"torch": 6.5 * tensors, "gradstats": 0.4 * tensors, "planned": planned_us}
    row = {
        "preset": f"{tensors:,} x 1",
        "tensors": tensors,
        "dtype": "float32",
        "scenario": HOST_OVERHEAD,
        "variant": variant,
        "device": "cpu",
        "speedup": times["torch"] / times["gradstats"],
        "planned_speedup": times["torch"] / planned_us,
        "budget_us": host.planned_budget_us(tensors),
        "within_budget": planned_us <= host.planned_budget_us(tensors),
    }
    for side, us in times.items():
        row[f"{side}_us"] = us
        row[f"{side}_ns_per_tensor"] = us * host.NS_PER_US / tensors
    return {**row, **extra}


def _mixed_results(tmp_path, planned_us: float):
    """A saved run: a bandwidth row with its planned side, host rows at the budget's size (one of
    them busy) and below it."""
    clip = {
        **bench_row("many-tiny", "float32", "clip", 12.0, 0.02),
        "gradstats_ms": 0.45,
        "torch_ms": 5.4,
        "gbps": 1.8,
        "planned_ms": 0.3,
        "planned_speedup": 18.0,
    }
    rows = [
        clip,
        _host_row(100, "clip-noop", 10.0),
        _host_row(TARGET, "clip-noop", planned_us),
        _host_row(TARGET, "clip", planned_us - 1.0),
        _host_row(TARGET, "clip", 9_999.0, busy=True, other_cpu_share=0.5),
    ]
    header = {"method": {"host_summary": host.METHOD}}
    return write_results(tmp_path / "cpu.json", rows, header)


def test_readme_block_renders_the_host_table_and_the_planned_columns(tmp_path, monkeypatch):
    readme_table = load_script("readme_table", monkeypatch)
    block = readme_table.block(_mixed_results(tmp_path, planned_us=BUDGET_US + 50.0))
    lines = block.splitlines()
    assert "| preset | dtype | scenario | gradstats ms | torch ms | speedup | planned ms |" in block
    assert any(
        line.startswith("| many-tiny | float32 | clip that clips |") and "| 18.00x |" in line
        for line in lines
    )
    assert host.METHOD in lines
    assert any(line.startswith("| tensors | case | torch us |") for line in lines)
    small = next(line for line in lines if line.startswith("| 100 | clip, nothing to clip |"))
    assert small.endswith("| 53 | yes |")
    over = next(line for line in lines if line.startswith("| 10,000 | clip, nothing to clip |"))
    assert over.endswith("| 350 | **no** |")
    assert "9999" not in block and "9,999" not in block  # the busy row is left out, and named:
    left_out = next(line for line in lines if line.startswith("Left out:"))
    assert "10,000 x 1 float32 host overhead (clip that clips) (50%)" in left_out


def test_a_run_of_busy_host_rows_says_why_their_table_is_empty_and_prints_no_other():
    rows = [_host_row(100, "clip", 10.0, busy=True, other_cpu_share=0.6)]
    text = report.markdown({}, rows)
    assert "| tensors | case |" not in text and "| 100 |" not in text  # no empty headers
    assert "No row of this table was kept: all 1 were measured while other processes" in text
    assert "| preset | dtype |" not in text and text.count("No row of this table") == 1
    assert "Left out: 1 row" in text


@pytest.mark.parametrize(("planned_us", "holds"), [(BUDGET_US - 100.0, "yes"), (400.0, "**no**")])
def test_targets_check_the_planned_budget(tmp_path, capsys, monkeypatch, planned_us, holds):
    targets = load_script("targets", monkeypatch)
    path = _mixed_results(tmp_path, planned_us)
    assert targets.main([str(path), "--strict"]) == (0 if holds == "yes" else 1)
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if line.startswith("| planned clip_grad_norm_"))
    assert "<= 350 us on 10,000 tensors (50 us + 30 ns per tensor)" in line
    # The two quiet rows at 10,000 tensors, told apart by their variant; the busy one left out.
    assert f"| 2 | {planned_us:.2f} us |" in line
    assert f"10,000 x 1 float32 clip-noop {planned_us:.2f} us" in line
    assert "9999" not in line
    assert line.endswith(f"| {holds} |")


def _next_float(value):
    return torch.nextafter(value, torch.tensor(math.inf, dtype=value.dtype))


def _unclipped(plan, max_norm, *args, **kwargs):
    """Returns the norm and leaves the gradients as they were."""
    return plan.grad_stats().total_norm


@pytest.mark.parametrize(
    ("scenario", "method", "wrap", "message"),
    [
        ("clip-noop", "clip_grad_norm_", lambda out: out * 2, "planned gives norm"),
        ("clip", "clip_grad_norm_", _next_float, "differs from the plain call's (norm"),
        (HOST_OVERHEAD, "clip_grad_norm_", lambda out: out * 2, "planned gives norm"),
        ("stats", "grad_stats", lambda st: dataclasses.replace(st, norms=_next_float(st.norms)),
         "differs from the plain call's (norms"),
    ],
)  # fmt: skip
def test_a_wrong_planned_result_stops_the_bench_before_timing(
    monkeypatch, capsys, scenario, method, wrap, message
):
    original = getattr(gradstats.GradPlan, method)
    monkeypatch.setattr(
        gradstats.GradPlan, method, lambda plan, *a, **k: wrap(original(plan, *a, **k))
    )
    assert bench.main([*QUICK, "--dtype", "float32", "--scenario", scenario]) == bench.EXIT_ERROR
    err = capsys.readouterr().err
    assert message in err and "not timing a wrong result" in err


def test_a_planned_clip_that_does_not_clip_stops_the_bench(monkeypatch, capsys):
    monkeypatch.setattr(gradstats.GradPlan, "clip_grad_norm_", _unclipped)
    assert bench.main([*QUICK, "--dtype", "float32", "--scenario", "clip"]) == bench.EXIT_ERROR
    assert "clip: planned left the gradients" in capsys.readouterr().err
