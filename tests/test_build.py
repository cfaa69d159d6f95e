"""setup.py's build decisions, without building: which CUDA architectures, and the clear stop for
architectures or toolkits too old for the kernels' 32 KB parameter tables."""

from __future__ import annotations

import importlib.util
import stat
import sys
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
    with pytest.raises(SystemExit, match=r"pip install --no-build-isolation \."):
        setup_py.import_torch()


def test_the_isolation_check_can_pass(setup_py):
    assert setup_py.import_torch().__version__
