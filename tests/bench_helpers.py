"""Shared helpers of the benchmark tests: the smoke-run arguments, the benchmarks/ script loader,
and synthetic result rows (nothing timed)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
# --busy-share 1: a smoke run on a shared machine keeps its rows however busy the machine is.
QUICK = [
    "--quick",
    "--device",
    "cpu",
    "--preset",
    "many-tiny",
    "--no-progress",
    "--busy-share",
    "1",
]


@pytest.fixture(autouse=True)
def scratch_folder(tmp_path, monkeypatch):
    """Autouse where imported: a run without --json writes its results folder under the current
    folder, so the tests run in a scratch one."""
    monkeypatch.chdir(tmp_path)


def load_script(name: str, monkeypatch):
    """Imports benchmarks/NAME.py (a script folder, not a package), registered for dataclasses."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, module)
    spec.loader.exec_module(module)
    return module


def bench_row(preset: str, dtype: str, scenario: str, speedup: float, fraction: float) -> dict:
    """A bandwidth row with the fields the targets read."""
    return {
        "preset": preset,
        "dtype": dtype,
        "scenario": scenario,
        "device": "cpu",
        "speedup": speedup,
        "floor_fraction": fraction,
        "bytes": 1,
    }


def write_results(path: Path, rows: list[dict[str, Any]], header: dict | None = None) -> Path:
    path.write_text(json.dumps({"header": header or {}, "rows": rows}))
    return path
