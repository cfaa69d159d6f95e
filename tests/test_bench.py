"""Smoke tests of `python -m gradstats info` and `python -m gradstats bench`; nothing is timed."""

from __future__ import annotations

import ast
import importlib.util
import json
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import ClassVar

import pytest
import torch
from bench_helpers import QUICK, ROOT, bench_row, load_script, scratch_folder  # noqa: F401
from helpers import child_env

import gradstats
import gradstats._files
from gradstats import bench
from gradstats.bench import cli, env, plot, report, runner
from gradstats.bench.cases import BANDWIDTH_SCENARIOS
from gradstats.bench.presets import PRESET_NAMES, make_preset

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
    """python -m gradstats ARGS, from the (scratch) current folder."""
    return subprocess.run(
        [sys.executable, "-m", "gradstats", *args],
        capture_output=True,
        text=True,
        env=child_env(),
        timeout=SUBPROCESS_TIMEOUT_S,
    )


# What the bench may import from gradstats besides __all__: writing its files whole (not an API
# the bench measures; the monitor writes its own files with it too).
NOT_MEASURED = {"gradstats._files"}


def test_bench_uses_only_the_public_api():
    """gradstats.bench is a user of gradstats: __all__ names only, no private module."""
    public = {*gradstats.__all__, *NOT_MEASURED, "__file__"}
    used = []
    for path in sorted((ROOT / "gradstats" / "bench").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "gradstats":
                used += [(path.name, alias.name) for alias in node.names if alias.name != "bench"]
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("gradstats."):
                used.append((path.name, node.module))
            elif isinstance(node, ast.Attribute) and getattr(node.value, "id", None) == "gradstats":
                used.append((path.name, node.attr))
    private = [
        (name, what)
        for name, what in used
        if what not in public and what.split(".")[:2] != ["gradstats", "bench"]
    ]
    assert used and not private


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


def test_info_lines_keep_their_columns():
    """Every "label: value" line starts its value in one column, and every op's kernels start in
    one column too (feature_stats, the longest op name, included)."""

    def value_column(line: str, after: int) -> int:
        return after + len(line[after:]) - len(line[after:].lstrip())

    lines = env.info_lines()
    labelled = [line for line in lines if re.match(r"[A-Za-z ]+: ", line)]
    assert len(labelled) >= 6
    assert {value_column(line, line.index(":") + 1) for line in labelled} == {env.INFO_LABEL_WIDTH}
    ops = [line for line in lines if line.startswith("  gradstats::")]
    assert len(ops) == len(gradstats.kernel_devices()) >= 3
    assert any("feature_stats" in line for line in ops)
    names_end = [line.index(" ", len("  gradstats::")) for line in ops]
    assert len({value_column(line, end) for line, end in zip(ops, names_end)}) == 1, ops


def test_bench_quick_writes_json_with_the_row_fields(tmp_path, capsys):
    out = tmp_path / "bench.json"
    clips = ["--scenario", "stats", "clip-noop", "clip"]
    assert bench.main([*QUICK, "--dtype", "float32", "bfloat16", *clips, "--json", str(out)]) == 0
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
        # GradPlan timed next to the plain call, planned once for every call.
        assert row["planned_ms"] > 0
        assert row["planned_speedup"] == pytest.approx(row["torch_ms"] / row["planned_ms"])
    assert "| planned ms | planned speedup |" in printed
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
    order = list(reversed(BANDWIDTH_SCENARIOS))
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


def test_a_wrong_flag_prints_the_bench_usage():
    """Not the usage of `python -m gradstats`, which knows none of the bench's flags."""
    result = _run_module("bench", "--quik")
    assert result.returncode == 2
    assert result.stderr.startswith("usage: python -m gradstats bench")
    assert "--busy-share" in result.stderr
    assert "unrecognized arguments: --quik" in result.stderr


def test_a_run_writes_its_results_to_a_folder_by_default(tmp_path, capsys):
    args = [*QUICK, "--dtype", "float32", "--scenario", "stats"]
    assert bench.main(args) == 0
    (folder,) = (tmp_path / cli.DEFAULT_OUT_ROOT).iterdir()
    assert folder.name.startswith("cpu-")
    files = {kind: folder / name for kind, name in cli.RESULT_FILES.items()}
    captured = capsys.readouterr()
    assert f"results go to {cli.DEFAULT_OUT_ROOT / folder.name}" in captured.err
    wrote = captured.out.strip().splitlines()[-1]
    assert wrote.startswith(f"wrote results: {cli.DEFAULT_OUT_ROOT / folder.name / 'results.json'}")
    (row,) = json.loads(files["json"].read_text())["rows"]
    assert row["scenario"] == "stats"
    assert "| many-tiny | float32 | stats vs get_total_norm |" in files["markdown"].read_text()
    if importlib.util.find_spec("matplotlib") is not None:
        assert files["plot"].read_bytes().startswith(PNG_MAGIC)
        assert f"plot: {cli.DEFAULT_OUT_ROOT / folder.name / 'results.png'}" in wrote
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        f.name for f in files.values() if f.exists()
    )  # no temporary file left behind


def test_out_names_the_folder_and_json_alone_writes_only_the_json(tmp_path, capsys):
    out = tmp_path / "mine"
    args = [*QUICK, "--dtype", "float32", "--scenario", "stats"]
    assert bench.main([*args, "--out", str(out), "--plot", str(tmp_path / "p.png")]) in (
        0,
        bench.EXIT_NO_PLOT,
    )
    assert (out / "results.json").exists() and (out / "results.md").exists()
    assert not (out / "results.png").exists()  # --plot named its own file
    assert bench.main([*args, "--json", str(tmp_path / "only.json")]) == 0
    assert (tmp_path / "only.json").exists()
    assert not (tmp_path / cli.DEFAULT_OUT_ROOT).exists()


def test_json_is_replaced_whole_or_not_at_all(tmp_path, monkeypatch):
    """A run stopped while it saves leaves the last complete file, and no half-written one."""
    path = tmp_path / "r.json"
    report.write_json(path, {"n": 1}, [])

    def interrupted(source, target):
        raise KeyboardInterrupt

    monkeypatch.setattr(gradstats._files.os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        report.write_json(path, {"n": 2}, [{"preset": "x"}])
    assert json.loads(path.read_text())["header"] == {"n": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]


def test_progress_says_it_is_still_timing_during_a_long_row(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "tqdm", None)  # plain lines
    tick_s = 0.05
    progress = report.Progress(2, enabled=True, tick_s=tick_s)
    progress.start("gpt2-small float32 adamw-step")
    time.sleep(tick_s * 5)
    progress.step()
    progress.close()
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "still timing" in line]
    assert len(lines) >= 2, err
    assert lines[0].startswith("[1/2] gpt2-small float32 adamw-step: still timing (")


def test_targets_script_reports_holds_and_misses(tmp_path, capsys, monkeypatch):
    targets = load_script("targets", monkeypatch)
    rows = [
        bench_row("gpt2-small", "float32", "stats", 2.0, 0.9),
        bench_row("gpt2-small", "bfloat16", "stats", 1.1, 0.5),
    ]
    path = tmp_path / "r.json"
    path.write_text(json.dumps({"header": {}, "rows": rows}))
    assert targets.main([str(path)]) == 0
    assert targets.main([str(path), "--strict"]) == 1
    table = capsys.readouterr().out
    assert "| stats >= 1.5x get_total_norm (float32, bfloat16) | 2 | 1.10x |" in table
    assert "not measured" in table  # the clip targets have no rows here


def test_targets_hold_the_optimizer_to_torch_on_every_preset(tmp_path, capsys, monkeypatch):
    targets = load_script("targets", monkeypatch)
    rows = [
        bench_row("gpt2-small", "float32", "adamw-step", 1.16, 1.0),
        bench_row("many-tiny", "bfloat16", "adamw-step", 0.96, 0.0),
    ]
    path = tmp_path / "r.json"
    path.write_text(json.dumps({"header": {}, "rows": rows}))
    assert targets.main([str(path), "--strict"]) == 1
    line = next(x for x in capsys.readouterr().out.splitlines() if "ClipGradOptimizer step" in x)
    assert "| 2 | 0.96x |" in line and line.endswith("| **no** |")


def test_readme_table_updates_and_checks_the_marked_block(tmp_path, monkeypatch):
    readme_table = load_script("readme_table", monkeypatch)
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


def _busy_results(tmp_path: Path) -> Path:
    """A saved run with a busy row (a slowdown that is another process's work) and a negative
    AdamW wrapper cost (noise); nothing is timed."""
    rows = [
        {**bench_row("gpt2-small", "float32", "stats", 1.4, 0.9), "other_cpu_share": 0.01},
        {**bench_row("many-small", "float32", "clip-noop", 12.0, 0.2), "busy": False},
        {
            **bench_row("many-small", "float32", "clip", 0.13, 0.01),
            "other_cpu_share": 0.4,
            "busy": True,
        },
        {
            **bench_row("gpt2-small", "float32", "adamw-step", 1.1, 0.8),
            "device": "cuda",
            "overhead_reads": -0.25,
            "adamw_ms": 1.0,
        },
    ]
    for row in rows:
        row.update(gradstats_ms=1.0, torch_ms=row["speedup"], gbps=1.0)
    header = {"machine": {"cpu_threads": 2}, "method": {"busy_share": 0.05, "busy_retries": 2}}
    path = tmp_path / "cpu.json"
    path.write_text(json.dumps({"header": header, "rows": rows}))
    return path


def test_busy_rows_and_negative_costs_are_not_published(tmp_path):
    header, rows = report.read_json(_busy_results(tmp_path))
    text = report.markdown(header, rows)
    table = [line for line in text.splitlines() if line.startswith("| ")]
    assert any(
        line.startswith("| gpt2-small | float32 | stats vs get_total_norm |") for line in table
    )
    assert not any(line.startswith("| many-small | float32 | clip that clips |") for line in table)
    assert "0.13x" not in text
    left_out = next(line for line in text.splitlines() if line.startswith("Left out:"))
    assert "1 row measured while other processes used more than 5% of the 2 CPUs" in left_out
    assert "keep them with --busy-share 1" in left_out
    assert "many-small float32 clip that clips (40%)" in left_out
    assert "noise (< 0)" in text and "-0.25" not in text


def test_a_table_whose_rows_were_all_busy_says_why_instead_of_empty_headers():
    rows = [
        {**bench_row("many-tiny", "float32", scenario, 2.0, 0.1), "busy": True}
        for scenario in BANDWIDTH_SCENARIOS
    ]
    rows.append({"scenario": "host-overhead", "busy": True, "other_cpu_share": 0.7})
    for row in rows:
        row.update(preset=row.get("preset", "100 x 1"), dtype="float32", gradstats_ms=1.0)
        row.update(torch_ms=2.0, gbps=1.0, other_cpu_share=0.7)
    text = report.markdown({"method": {"busy_share": 0.05}}, rows)
    assert "| preset |" not in text and "| tensors |" not in text
    assert text.count("No row of this table was kept") == 2
    assert f"all {len(BANDWIDTH_SCENARIOS)} were measured while other processes" in text
    assert "all 1 were measured" in text
    assert "--busy-share 1" in text


def test_rows_without_the_busy_flag_are_judged_by_their_share():
    assert report.is_busy({"other_cpu_share": 0.3})
    assert not report.is_busy({"other_cpu_share": 0.01})
    assert not report.is_busy({"other_cpu_share": 0.3, "busy": False})  # the run's own verdict


def test_readme_table_leaves_busy_rows_out(tmp_path, monkeypatch):
    readme_table = load_script("readme_table", monkeypatch)
    block = readme_table.block(_busy_results(tmp_path))
    assert "| many-small | float32 | clip, nothing to clip |" in block
    assert "| many-small | float32 | clip that clips |" not in block
    assert "Left out: 1 row" in block


def test_targets_leave_busy_rows_and_noise_out_of_the_claims(tmp_path, capsys, monkeypatch):
    targets = load_script("targets", monkeypatch)
    assert targets.main([str(_busy_results(tmp_path)), "--strict"]) == 1  # float32 stats misses
    out = capsys.readouterr().out
    assert "| many tensors: clip_grad_norm_ >= 10x | 1 | 12.00x | many-small float32 " in out
    assert "0.13x" not in out
    assert "Left out: 1 row" in out and "many-small float32 clip that clips (40%)" in out
    cost = next(line for line in out.splitlines() if line.startswith("| ClipGradOptimizer costs"))
    assert "noise (< 0)" in cost and "-0.25" not in cost and cost.endswith("| - |")


class _Load:
    """Stands in for env.OtherLoad: other processes' shares, one per timing, from a script."""

    shares: ClassVar[list[float]] = []

    def start(self) -> None:
        pass

    def share(self) -> float:
        return _Load.shares.pop(0)


@pytest.mark.parametrize(
    ("shares", "attempts", "busy", "kept"),
    [
        ([0.5, 0.0], 2, False, 0.0),  # quiet on the second try
        ([0.5, 0.3, 0.4], 1 + runner.BUSY_RETRIES, True, 0.3),  # busy throughout: least busy kept
        ([0.01], 1, False, 0.01),
    ],
)
def test_busy_rows_are_timed_again_then_marked(tmp_path, monkeypatch, shares, attempts, busy, kept):
    monkeypatch.setattr(env, "OtherLoad", _Load)
    monkeypatch.setattr(_Load, "shares", list(shares))
    monkeypatch.setattr(runner, "BUSY_PAUSE_S", 0.0)
    out = tmp_path / "bench.json"
    args = [*QUICK, "--busy-share", "0.05", "--dtype", "float32", "--scenario", "stats"]
    assert bench.main([*args, "--json", str(out)]) == 0
    (row,) = json.loads(out.read_text())["rows"]
    assert (row["attempts"], row["busy"], row["other_cpu_share"]) == (attempts, busy, kept)
    assert _Load.shares == []


def test_a_machine_that_stays_busy_is_not_retried_row_after_row(tmp_path, monkeypatch):
    """After a row stayed busy through its retries, the next rows are timed once each, until one
    is quiet; the header says how many were."""
    monkeypatch.setattr(env, "OtherLoad", _Load)
    tries = 1 + runner.BUSY_RETRIES
    busy_then_quiet = [0.5] * tries + [0.5, 0.0] + [0.5] * tries
    monkeypatch.setattr(_Load, "shares", busy_then_quiet)
    monkeypatch.setattr(runner, "BUSY_PAUSE_S", 0.0)
    out = tmp_path / "bench.json"
    scenarios = ["--scenario", "stats", "clip-noop", "clip", "adamw-step"]
    args = [*QUICK, "--busy-share", "0.05", "--dtype", "float32", *scenarios, "--json", str(out)]
    assert bench.main(args) == 0
    payload = json.loads(out.read_text())
    attempts = [(row["attempts"], row["busy"]) for row in payload["rows"]]
    assert attempts == [(tries, True), (1, True), (1, False), (tries, True)]
    assert any("1 busy row(s) were timed once" in note for note in payload["header"]["notes"])
    assert _Load.shares == []


def test_plot_axes_cover_every_bar_and_the_legend_covers_none():
    pyplot = pytest.importorskip("matplotlib.pyplot")
    rows = [
        {**bench_row("gpt2-small", "float32", scenario, speedup, fraction), "busy": False}
        for scenario, speedup, fraction in (
            ("stats", 1.4, 0.9),
            ("clip-noop", 40.0, 0.95),
            ("clip", 0.7, 1.3),
            ("adamw-step", 1.1, 1.1),
        )
    ]
    rows.append({**bench_row("many-small", "float32", "clip", 500.0, 9.0), "busy": True})
    fig = plot.figure({}, rows)
    try:
        top, bottom = fig.axes
        low, high = top.get_ylim()
        assert low < 0.7 and high > 40.0  # the busy row's 500x is left out, not plotted
        assert high < 500.0
        assert bottom.get_ylim()[1] > 130.0
        fig.canvas.draw()
        (legend,) = fig.legends
        box = legend.get_window_extent()
        assert not any(box.overlaps(ax.get_window_extent()) for ax in (top, bottom))
        assert len(legend.get_texts()) == len(BANDWIDTH_SCENARIOS)  # one each, not one per panel
    finally:
        pyplot.close(fig)
