"""The CUDA path's host-side planner, and its kernels run on the host: tested without a GPU.

Each tests/cpp program is compiled with the system C++ compiler and run:
- test_planner.cpp, against the planner's plain C++ sources (no torch, no CUDA): chunk
  boundaries, empty tensors, tensors larger than one chunk and than 2^31 elements, lists longer
  than one launch, mixed dtypes, misaligned pointers, strided layouts;
- test_walkers.cpp: the kernels' chunk walks (csrc/cuda/device.cuh) visit every element once;
- test_kernels.cpp: the stats and scale kernels themselves (csrc/cuda/kernels.cuh) on the host
  (tests/cpp/host_cuda.h: fibers for threads), against partial.h's exact statistics, and bitwise
  the same for any grid, block order and split into launches;
- test_features.cpp: feature_stats' sizing (pieces, grid, workspace bound) and its kernels
  (csrc/cuda/features.cuh) on the host, against a serial accumulation.
The last three need torch's and the CUDA toolkit's headers (not a GPU). They check the kernels'
logic, not how a GPU runs them.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
CPP = ROOT / "tests" / "cpp"
# Compiling and running a test program takes seconds; this bounds a hung compiler.
TIMEOUT_S = 300
CXXFLAGS = ["-std=c++17", "-O1", "-Wall", "-Wextra", "-Werror", f"-I{ROOT / 'csrc'}"]


def _compiler() -> str:
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler (g++ or $CXX) to build the test program")
    return cxx


def _cuda_include() -> Path:
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and (Path(home) / "include" / "cuda_runtime_api.h").exists():
            return Path(home) / "include"
    pytest.skip("no CUDA toolkit headers (cuda_runtime_api.h) for the walk test")


def _build_and_run(tmp_path: Path, sources: list[Path], flags: list[str]) -> None:
    binary = tmp_path / sources[0].stem
    cmd = [_compiler(), *CXXFLAGS, *flags, *map(str, sources), "-o", str(binary)]
    built = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert built.returncode == 0, f"building {sources[0].name} failed:\n{built.stderr}"
    run = subprocess.run([str(binary)], capture_output=True, text=True, timeout=TIMEOUT_S)
    summary = re.search(r"(\d+) passed, (\d+) failed", run.stdout)
    assert summary is not None, f"no summary line in the output of {binary.name}:\n{run.stdout}"
    assert run.returncode == 0 and summary.group(2) == "0", run.stdout
    assert int(summary.group(1)) > 0


def test_planner(tmp_path):
    _build_and_run(tmp_path, [CPP / "test_planner.cpp", ROOT / "csrc" / "cuda" / "planner.cpp"], [])


def _device_code_flags() -> list[str]:
    torch_include = Path(torch.__file__).parent / "include"
    # torch's headers are not -Wextra clean: include them as system headers. The device code's
    # #pragma unroll means nothing to a host compiler.
    flags = ["-isystem", str(torch_include), "-isystem", str(_cuda_include()), f"-I{CPP}"]
    return [*flags, "-Wno-unknown-pragmas"]


def test_chunk_walks_on_host(tmp_path):
    _build_and_run(tmp_path, [CPP / "test_walkers.cpp"], _device_code_flags())


def test_kernels_on_host(tmp_path):
    sources = [CPP / "test_kernels.cpp", ROOT / "csrc" / "cuda" / "planner.cpp"]
    _build_and_run(tmp_path, sources, _device_code_flags())


def test_feature_stats_sizing_and_kernels_on_host(tmp_path):
    _build_and_run(tmp_path, [CPP / "test_features.cpp"], _device_code_flags())
