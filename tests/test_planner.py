"""The CUDA kernels' host-side planner (csrc/cuda/planner.h), tested without a GPU.

tests/cpp/test_planner.cpp is compiled with the system C++ compiler against the planner's plain
C++ sources (no torch, no CUDA) and run; it covers chunk boundaries, empty tensors, tensors larger
than one chunk and than 2^31 elements, lists longer than one launch, mixed dtypes, misaligned
pointers and strided layouts.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SOURCES = [ROOT / "tests" / "cpp" / "test_planner.cpp", ROOT / "csrc" / "cuda" / "planner.cpp"]
# Compiling and running the test program takes a few seconds; this bounds a hung compiler.
TIMEOUT_S = 300


def _compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")


@pytest.fixture(scope="module")
def planner_binary(tmp_path_factory) -> Path:
    cxx = _compiler()
    if cxx is None:
        pytest.skip("no C++ compiler (g++ or $CXX) to build the planner test")
    binary = tmp_path_factory.mktemp("planner") / "test_planner"
    cmd = [cxx, "-std=c++17", "-O1", "-Wall", "-Wextra", "-Werror", f"-I{ROOT / 'csrc'}"]
    cmd += [str(s) for s in SOURCES] + ["-o", str(binary)]
    built = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert built.returncode == 0, f"building the planner test failed:\n{built.stderr}"
    return binary


def test_planner(planner_binary):
    run = subprocess.run([str(planner_binary)], capture_output=True, text=True, timeout=TIMEOUT_S)
    summary = re.search(r"(\d+) passed, (\d+) failed", run.stdout)
    assert summary is not None, f"no summary line in the planner test's output:\n{run.stdout}"
    assert run.returncode == 0 and summary.group(2) == "0", run.stdout
    assert int(summary.group(1)) > 0
