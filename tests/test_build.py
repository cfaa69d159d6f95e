"""setup.py's build decisions, without building: which CUDA architectures, and the clear stop for
architectures or toolkits too old for the kernels' 32 KB parameter tables."""

from __future__ import annotations

import importlib.util
import os
import re
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def setup_py(monkeypatch):
    for name in ("GRADSTATS_CUDA_ARCHS", "TORCH_CUDA_ARCH_LIST"):
        monkeypatch.delenv(name, raising=False)
    spec = importlib.util.spec_from_file_location("gradstats_setup", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # defines the functions; builds nothing (not __main__)
    return module


def fake_toolkit(tmp_path: Path, release: str) -> str:
    nvcc = tmp_path / "bin" / "nvcc"
    nvcc.parent.mkdir(parents=True)
    nvcc.write_text(f"#!/bin/sh\necho 'Cuda compilation tools, release {release}, V{release}.0'\n")
    nvcc.chmod(nvcc.stat().st_mode | stat.S_IEXEC)
    return str(tmp_path)


def test_default_architectures(setup_py, tmp_path):
    assert setup_py.decide_cuda_archs(fake_toolkit(tmp_path, "13.0")) == setup_py.DEFAULT_CUDA_ARCHS


def test_torch_arch_list_is_used_when_new_enough(setup_py, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "7.0 7.5 8.0 8.6 9.0+PTX")
    assert setup_py.decide_cuda_archs(fake_toolkit(tmp_path, "12.4")) == "7.0 7.5 8.0 8.6 9.0+PTX"


@pytest.mark.parametrize("archs", ["5.2 6.0 6.1 7.0 7.5 8.0 8.6 9.0+PTX", "Pascal;Volta", "6.1"])
def test_old_architectures_stop_the_build_with_the_fix(setup_py, tmp_path, monkeypatch, archs):
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", archs)
    with pytest.raises(SystemExit, match=r"compute capability >= 7\.0.*GRADSTATS_CUDA_ARCHS"):
        setup_py.decide_cuda_archs(fake_toolkit(tmp_path, "13.0"))


def test_gradstats_archs_override_an_old_torch_arch_list(setup_py, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "5.2 6.0 6.1 7.0")
    monkeypatch.setenv("GRADSTATS_CUDA_ARCHS", "9.0")
    assert setup_py.decide_cuda_archs(fake_toolkit(tmp_path, "13.0")) == "9.0"


def test_an_old_toolkit_stops_the_build(setup_py, tmp_path):
    with pytest.raises(SystemExit, match=r"release 11\.8.*nvcc >= 12\.1"):
        setup_py.decide_cuda_archs(fake_toolkit(tmp_path, "11.8"))


def test_build_isolation_stops_with_the_command_to_use(setup_py, monkeypatch):
    """Plain `pip install .` runs setup.py where torch cannot be imported: one clear message."""
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch now fails, as in isolation
    with pytest.raises(SystemExit, match=r"pip install --no-build-isolation --no-deps \."):
        setup_py.import_torch()


def test_the_isolation_check_can_pass(setup_py):
    assert setup_py.import_torch().__version__


def test_a_long_compile_is_named_every_tick(setup_py, tmp_path, capsys):
    """A stand-in compiler (a child process whose command line names the source) runs for a few
    ticks: the heartbeat names its source, with the seconds it has run, once a tick."""
    source = tmp_path / "csrc" / "slow.cpp"
    tick_s = 0.2
    compiler = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(60)", "-c", str(source)]
    )
    try:
        with setup_py.compile_heartbeat({str(source): "csrc/slow.cpp"}, tick_s=tick_s):
            time.sleep(tick_s * 4.5)
    finally:
        compiler.kill()
        compiler.wait()
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) >= 3, lines
    assert all(
        re.fullmatch(r"gradstats build: still compiling csrc/slow\.cpp \(\d+ s\)", x) for x in lines
    )


def test_only_running_compiles_are_named(setup_py, tmp_path):
    assert (
        setup_py.compiling_sources({str(tmp_path / "csrc" / "idle.cpp"): "idle"}, os.getpid()) == {}
    )


def test_builds_share_one_object_folder(setup_py):
    """./run's in-place build, `pip wheel .` and pip's editable install (which would compile in a
    fresh temporary folder) all keep their objects in build/, so none compiles what another did."""
    assert setup_py.BUILD_TEMP.parent == ROOT / "build"
    assert setup_py.BUILD_TEMP.name.startswith("temp.")
