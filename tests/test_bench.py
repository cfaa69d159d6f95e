"""Smoke tests of `python -m gradstats info` and `python -m gradstats bench`; nothing is timed."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import gradstats
from gradstats import bench
from gradstats.bench.cases import SCENARIOS
from gradstats.bench.presets import PRESET_NAMES, make_preset

ROOT = Path(__file__).resolve().parents[1]
QUICK = ["--quick", "--device", "cpu", "--preset", "many-tiny", "--no-progress"]
REQUIRED = (
    "preset",
    "dtype",
    "scenario",
    "device",
    "gradstats_ms",
    "torch_ms",
    "speedup",
    "gbps",
    "floor_fraction",
)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SUBPROCESS_TIMEOUT_S = 120

# Parameter counts of the real models (Hugging Face gpt2, Llama-3.2-1B, torchvision).
MODEL_SIZES = {
    "gpt2-small": (148, 124_439_808),
    "llama-1b": (146, 1_235_814_400),
    "resnet50": (161, 25_557_032),
    "vit-b16": (152, 86_567_656),
}


def _run_module(*args: str) -> subprocess.CompletedProcess:
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path}
    return subprocess.run(
        [sys.executable, "-m", "gradstats", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=SUBPROCESS_TIMEOUT_S,
    )


@pytest.mark.parametrize("name", sorted(MODEL_SIZES))
def test_presets_have_the_models_parameter_counts(name):
    preset = make_preset(name)
    assert (preset.num_tensors, preset.numel) == MODEL_SIZES[name]


def test_every_preset_builds():
    for name in PRESET_NAMES:
        assert make_preset(name).numel > 0


def test_info_command():
    result = _run_module("info")
    assert result.returncode == 0, result.stderr
    assert f"gradstats {gradstats.__version__}" in result.stdout
    assert "built against: torch" in result.stdout
    assert "gradstats::stats" in result.stdout and "CPU" in result.stdout


def test_bench_quick_writes_json_with_the_row_fields(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert bench.main([*QUICK, "--dtype", "float32", "bfloat16", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| preset | dtype | scenario |" in printed
    assert f"wrote results: {out}" in printed
    payload = json.loads(out.read_text())
    header, rows = payload["header"], payload["rows"]
    assert header["machine"]["cpu_threads"] >= 1
    assert header["versions"]["torch"] == torch.__version__
    assert {(r["dtype"], r["scenario"]) for r in rows} >= {
        (d, s) for d in ("float32", "bfloat16") for s in ("stats", "clip-noop", "clip")
    }
    for row in rows:
        missing = [key for key in REQUIRED if key not in row]
        assert not missing, f"row lacks {missing}"
        assert row["device"] == "cpu" and row["preset"] == "many-tiny"
        assert row["gradstats_ms"] > 0 and row["torch_ms"] > 0 and row["floor_gbps"] > 0
        assert row["speedup"] == pytest.approx(row["torch_ms"] / row["gradstats_ms"])
        assert row["gbps"] > 0 and row["floor_fraction"] > 0
    clip = next(r for r in rows if r["scenario"] == "clip")
    stats = next(r for r in rows if r["scenario"] == "stats" and r["dtype"] == clip["dtype"])
    assert clip["bytes"] == 3 * stats["bytes"]  # clipping reads twice and writes once


def test_markdown_and_plot_from_saved_json(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out, png = tmp_path / "bench.json", tmp_path / "bench.png"
    assert bench.main([*QUICK, "--dtype", "float16", "--json", str(out)]) == 0
    capsys.readouterr()
    assert bench.main(["--from-json", str(out), "--plot", str(png)]) == 0
    printed = capsys.readouterr().out
    assert "| many-tiny | float16 |" in printed
    assert f"wrote plot: {png}" in printed
    assert png.read_bytes().startswith(PNG_MAGIC)


def test_json_and_plot_paths_are_printed(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out, png = tmp_path / "bench.json", tmp_path / "bench.png"
    args = [*QUICK, "--dtype", "float32", "--scenario", "stats"]
    assert bench.main([*args, "--json", str(out), "--plot", str(png)]) == 0
    printed = capsys.readouterr().out
    assert f"wrote results: {out}; plot: {png}" in printed
    assert out.exists() and png.exists()


def test_plot_without_matplotlib_says_so(tmp_path, capsys, monkeypatch):
    out = tmp_path / "bench.json"
    args = [*QUICK, "--dtype", "float32", "--scenario", "stats", "--json", str(out)]
    assert bench.main(args) == 0
    capsys.readouterr()
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    code = bench.main(["--from-json", str(out), "--plot", str(tmp_path / "x.png")])
    assert code == bench.EXIT_NO_PLOT
    captured = capsys.readouterr()
    assert "pip install matplotlib" in captured.err
    assert "wrote" not in captured.out  # the plot it could not write is not announced
    assert not (tmp_path / "x.png").exists()


def test_adamw_step_scenario(tmp_path):
    out = tmp_path / "bench.json"
    args = [*QUICK, "--dtype", "float32", "--scenario", "adamw-step", "--json", str(out)]
    assert bench.main(args) == 0
    (row,) = json.loads(out.read_text())["rows"]
    assert row["scenario"] == "adamw-step"
    assert row["adamw_ms"] > 0 and row["gradstats_ms"] > 0
    assert "overhead_reads" in row


def test_scenarios_run_in_any_order(tmp_path):
    """The gradient pool is built again after adamw-step freed it (the order the user gave)."""
    out = tmp_path / "bench.json"
    order = list(reversed(SCENARIOS))
    args = [*QUICK, "--dtype", "float32", "--scenario", *order, "--json", str(out)]
    assert bench.main(args) == 0
    assert [r["scenario"] for r in json.loads(out.read_text())["rows"]] == order


def test_bench_quick_as_a_module():
    result = _run_module("bench", *QUICK, "--dtype", "float32", "--scenario", "clip")
    assert result.returncode == 0, result.stderr
    assert "| many-tiny | float32 | clip that clips |" in result.stdout


def test_unknown_preset_is_refused():
    with pytest.raises(SystemExit, match="unknown preset"):
        bench.main(["--preset", "gpt5", "--device", "cpu"])


def _load_script(name: str, monkeypatch):
    """Imports benchmarks/NAME.py (a script folder, not a package), registered for dataclasses."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, module)
    spec.loader.exec_module(module)
    return module


def _row(preset: str, dtype: str, scenario: str, speedup: float, fraction: float) -> dict:
    return {
        "preset": preset,
        "dtype": dtype,
        "scenario": scenario,
        "device": "cpu",
        "speedup": speedup,
        "floor_fraction": fraction,
        "bytes": 1,
    }


def test_targets_script_reports_holds_and_misses(tmp_path, capsys, monkeypatch):
    targets = _load_script("targets", monkeypatch)
    rows = [
        _row("gpt2-small", "float32", "stats", 2.0, 0.9),
        _row("gpt2-small", "bfloat16", "stats", 1.1, 0.5),
    ]
    path = tmp_path / "r.json"
    path.write_text(json.dumps({"header": {}, "rows": rows}))
    assert targets.main([str(path)]) == 0
    assert targets.main([str(path), "--strict"]) == 1
    table = capsys.readouterr().out
    assert "| stats >= 1.5x get_total_norm (float32, bfloat16) | 2 | 1.10x |" in table
    assert "not measured" in table  # the clip targets have no rows here


def test_readme_table_updates_and_checks_the_marked_block(tmp_path, monkeypatch):
    readme_table = _load_script("readme_table", monkeypatch)
    out = tmp_path / "cpu.json"
    assert (
        bench.main([*QUICK, "--dtype", "float32", "--scenario", "stats", "--json", str(out)]) == 0
    )
    readme = tmp_path / "README.md"
    readme.write_text(
        "intro\n<!-- gradstats-bench:cpu -->\nold\n<!-- /gradstats-bench:cpu -->\nend\n"
    )
    assert readme_table.main([str(out), "--check", str(readme)]) == 1
    assert readme_table.main([str(out), "--update", str(readme)]) == 0
    assert readme_table.main([str(out), "--check", str(readme)]) == 0
    text = readme.read_text()
    assert text.startswith("intro\n") and text.endswith("end\n")
    assert "| many-tiny | float32 | stats vs get_total_norm |" in text
