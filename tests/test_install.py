"""How gradstats meets a user who installs it: the torch a wheel requires, `python -m gradstats
info` when the native library cannot load, and advice that fits how gradstats was installed.
Nothing is built: the wheel and sdist metadata checks run on small stand-ins (CI checks real ones
with tests/wheel_metadata_check.py)."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest
import torch
import wheel_metadata_check

import gradstats
from gradstats import _build, _install

PACKAGE = Path(gradstats.__file__).resolve().parent
SUBPROCESS_TIMEOUT_S = 120
EXIT_NOT_LOADED = 1


@pytest.fixture(scope="module")
def setup_py():
    return wheel_metadata_check.load_setup()


@pytest.mark.parametrize(
    ("version", "requirement"),
    [
        ("2.14.1", "torch==2.14.1"),  # PyPI's CUDA build, as pip sees it
        ("2.14.1+cu130", "torch==2.14.1"),  # PyTorch's index: the label cannot be required
        ("2.13.0+cpu", "torch==2.13.0+cpu"),  # CPU builds exist only labelled
        ("2.12.0+rocm6.4", "torch==2.12.0+rocm6.4"),
    ],
)
def test_a_wheel_requires_the_torch_it_was_built_against(setup_py, version, requirement):
    assert setup_py.wheel_torch_requirement(version) == requirement
    pinned = setup_py.pinned_requirements(requirement)
    assert pinned == [requirement, *setup_py.SOURCE_REQUIREMENTS[1:]]
    assert setup_py.SOURCE_REQUIREMENTS[0] == "torch>=2.11"  # what source installs keep


def _wheel(path: Path, requires: list[str]) -> Path:
    text = "Metadata-Version: 2.4\nName: gradstats\nVersion: 0.1.0\n"
    text += "".join(f"Requires-Dist: {r}\n" for r in requires)
    with zipfile.ZipFile(path, "w") as wheel:
        wheel.writestr("gradstats-0.1.0.dist-info/METADATA", text)
    return path


def _sdist(path: Path, requires: list[str], dynamic: bool) -> Path:
    text = "Metadata-Version: 2.4\nName: gradstats\nVersion: 0.1.0\n"
    text += "Dynamic: requires-dist\n" if dynamic else ""
    text += "".join(f"Requires-Dist: {r}\n" for r in requires)
    with tarfile.open(path, "w:gz") as sdist:
        for name in ("gradstats-0.1.0/PKG-INFO", "gradstats-0.1.0/gradstats.egg-info/PKG-INFO"):
            info = tarfile.TarInfo(name)
            info.size = len(text.encode())
            sdist.addfile(info, io.BytesIO(text.encode()))
    return path


def test_the_ci_metadata_check_passes_a_pinned_wheel_and_a_ranged_sdist(setup_py, tmp_path):
    pin = setup_py.wheel_torch_requirement(setup_py.installed_torch_version(torch))
    good = [
        _wheel(tmp_path / "good.whl", [pin, "numpy"]),
        _sdist(tmp_path / "good.tar.gz", ["torch>=2.11", "numpy"], dynamic=True),
    ]
    assert wheel_metadata_check.main([str(p) for p in good]) == 0
    assert wheel_metadata_check.main([str(_wheel(tmp_path / "ranged.whl", ["torch>=2.11"]))]) == 1
    static = _sdist(tmp_path / "static.tar.gz", ["torch>=2.11"], dynamic=False)
    assert wheel_metadata_check.main([str(static)]) == 1


def _copy_package(tmp_path: Path, build_info: dict | None) -> Path:
    """The package's Python files in tmp_path/gradstats, without the binary, with build_info as
    its _build_info.json (none when None): an installed copy whose library cannot load."""
    copy = tmp_path / "gradstats"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("*.so", "*.pyd", "__pycache__"))
    (copy / _build.BUILD_INFO_FILE.name).unlink(missing_ok=True)
    if build_info is not None:
        (copy / _build.BUILD_INFO_FILE.name).write_text(json.dumps(build_info))
    return copy


def _python(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    """Python in cwd, where the copy is found first (no PYTHONPATH to this checkout)."""
    return subprocess.run(
        [sys.executable, *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=SUBPROCESS_TIMEOUT_S,
    )


BUILT_HERE = {**gradstats.BUILD_INFO, "torch_cuda": torch.version.cuda}
OTHER_TORCH = {**BUILT_HERE, "torch": "2.11.0+cpu", "torch_cuda": None}


@pytest.mark.parametrize(
    ("build_info", "says"),
    [
        (OTHER_TORCH, "gradstats was built for torch 2.11.0+cpu (CUDA none) but torch "),
        (BUILT_HERE, "gradstats._C is missing: no _C"),
        (None, "gradstats is not built (no _build_info.json"),
    ],
    ids=["another-torch", "no-binary", "not-built"],
)
def test_info_says_what_is_wrong_when_the_library_cannot_load(tmp_path, build_info, says):
    _copy_package(tmp_path, build_info)
    result = _python(tmp_path, "-m", "gradstats", "info")
    assert result.returncode == EXIT_NOT_LOADED, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    out = result.stdout
    assert f"gradstats {gradstats.__version__} ({tmp_path / 'gradstats'})" in out
    assert f"installed:     torch {torch.__version__}" in out
    assert "library:       NOT LOADED" in out
    assert says in out
    # An installed copy (no checkout around it): the advice of a wheel user.
    assert "install the gradstats wheel built for the installed torch" in out
    assert _install.REGULAR in out
    bench = _python(tmp_path, "-m", "gradstats", "bench", "--quick")
    assert bench.returncode == EXIT_NOT_LOADED and "Traceback" not in bench.stderr
    assert "gradstats bench needs the native library" in bench.stderr


def test_import_still_raises_the_build_error(tmp_path):
    """Only `python -m gradstats` keeps the error for info: an import raises it, loudly."""
    _copy_package(tmp_path, OTHER_TORCH)
    result = _python(tmp_path, "-c", "import gradstats")
    assert result.returncode != 0
    assert "gradstats._build.BuildError: gradstats was built for torch 2.11.0+cpu" in result.stderr


@pytest.mark.parametrize(
    ("argv", "module"),
    [
        (["python", "-m", "gradstats", "info"], "gradstats"),
        (["python", "-X", "dev", "-mgradstats"], "gradstats"),
        (["python", "-Ximporttime", "-Im", "gradstats.__main__"], "gradstats.__main__"),
        (["python", "-W", "ignore", "-m", "other"], "other"),
        (["python", "-c", "import gradstats"], None),
        (["python", "script.py", "-m", "gradstats"], None),
        (["python"], None),
    ],
)
def test_the_module_of_python_dash_m(argv, module):
    assert _build.main_module(argv) == module


@pytest.mark.parametrize(
    ("release", "cuda", "fits"),
    [
        ("same", "same", True),  # PyPI's 2.14.1 and PyTorch's 2.14.1+cu130: one build
        ("same", "other", False),  # a CPU build of the same release, or another CUDA
        ("other", "same", False),
    ],
)
def test_a_build_fits_the_same_release_of_the_same_cuda(monkeypatch, release, cuda, fits):
    monkeypatch.setattr(torch, "__version__", "2.14.1+cu130")
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    built = {
        "torch": "2.14.1" if release == "same" else "2.13.0",
        "torch_cuda": "13.0" if cuda == "same" else None,
    }
    assert _build.fits_installed_torch(built) == fits
    assert not _build.fits_installed_torch({"torch": "2.14.1"})  # older records: exact version


def _tree(tmp_path: Path, run_script: bool) -> Path:
    (tmp_path / "gradstats").mkdir()
    (tmp_path / _install.SETUP_FILE).write_text("")
    if run_script:
        (tmp_path / _install.RUN_SCRIPT).write_text("")
    return tmp_path / "gradstats"


def test_advice_for_a_wheel(tmp_path):
    (tmp_path / "gradstats").mkdir()
    advice = _install.rebuild_advice(tmp_path / "gradstats")
    assert advice.startswith("install the gradstats wheel built for the installed torch")
    assert advice.endswith(_install.REGULAR)


def test_advice_for_an_in_place_build(tmp_path, monkeypatch):
    monkeypatch.setattr(_install, "editable_folders", list)
    advice = _install.rebuild_advice(_tree(tmp_path, run_script=True))
    assert f"cd {tmp_path.resolve()} && {_install.IN_PLACE}" in advice


def test_advice_for_an_editable_install(tmp_path, monkeypatch):
    package = _tree(tmp_path, run_script=False)
    monkeypatch.setattr(_install, "editable_folders", lambda: [tmp_path.resolve()])
    advice = _install.rebuild_advice(package, env="GRADSTATS_CPU_ISA=default ")
    assert advice == (
        f"rebuild the editable install: cd {tmp_path.resolve()} && GRADSTATS_CPU_ISA=default "
        f"{_install.EDITABLE}"
    )
    assert "editable_mode=compat" in _install.EDITABLE
