"""Loads the native library gradstats._C, with errors that say what the build was made for and how
to rebuild it the way gradstats was installed.

`python -m gradstats info` must work when the library cannot load: while Python locates the
package for `python -m gradstats`, import gradstats keeps the BuildError (load_error()) instead of
raising it, and gradstats.__main__ reports it.
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Iterator
from importlib.machinery import EXTENSION_SUFFIXES
from pathlib import Path
from typing import Any

import torch

from gradstats._cpuinfo import has_avx2
from gradstats._install import rebuild_advice

PACKAGE_DIR = Path(__file__).parent
BUILD_INFO_FILE = PACKAGE_DIR / "_build_info.json"
# What `python -m gradstats` shows in sys.argv[0] while Python locates the package.
_LOCATING_MAIN = "-m"
# Python's options that take the next word (or the rest of their own) as their value.
_OPTIONS_WITH_VALUE = ("W", "X")
_LONG_OPTIONS_WITH_VALUE = ("--check-hash-based-pycs",)
_load_error: BuildError | None = None


class BuildError(ImportError):
    """gradstats._C is missing or was built for another torch, CUDA or CPU. built: setup.py's
    record of the build (None when there is none)."""

    def __init__(self, message: str, built: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.built = built


def _installed() -> str:
    return f"torch {torch.__version__} (CUDA {torch.version.cuda or 'none'})"


def release(version: str) -> str:
    """The public release of a version: 2.14.1 of 2.14.1+cu130."""
    return version.split("+", 1)[0]


def read_build_info() -> dict[str, Any] | None:
    """setup.py's record of the build (None when gradstats is not built)."""
    if not BUILD_INFO_FILE.exists():
        return None
    return json.loads(BUILD_INFO_FILE.read_text())


def fits_installed_torch(built: dict[str, Any]) -> bool:
    """The binary works with the same torch release of the same CUDA flavour: PyPI's 2.14.1 and
    PyTorch's 2.14.1+cu130 are one build, 2.14.1+cpu is another. Build records from before
    torch_cuda was kept must match the version exactly."""
    if "torch_cuda" not in built:
        return built["torch"] == torch.__version__
    same_release = release(built["torch"]) == release(torch.__version__)
    return same_release and built["torch_cuda"] == torch.version.cuda


def load_library() -> tuple[Any, dict[str, Any]]:
    """Imports gradstats._C (registering torch.ops.gradstats); returns it and its build info."""
    built = read_build_info()
    if built is None:
        raise BuildError(
            f"gradstats is not built (no {BUILD_INFO_FILE.name} in {PACKAGE_DIR}); "
            + rebuild_advice(PACKAGE_DIR)
        )
    was_for = f"torch {built['torch']} (CUDA {built.get('torch_cuda', built['cuda']) or 'none'})"
    if not fits_installed_torch(built):
        raise BuildError(
            f"gradstats was built for {was_for} but {_installed()} is installed; "
            + rebuild_advice(PACKAGE_DIR),
            built,
        )
    if built["cpu_isa"] == "avx2" and not has_avx2():
        raise BuildError(
            "gradstats was built with AVX2/FMA/F16C CPU kernels but this CPU lacks them; "
            + rebuild_advice(PACKAGE_DIR, env="GRADSTATS_CPU_ISA=default "),
            built,
        )
    binaries = [PACKAGE_DIR / f"_C{suffix}" for suffix in EXTENSION_SUFFIXES]
    if not any(path.exists() for path in binaries):
        raise BuildError(
            f"gradstats._C is missing: no {binaries[0].name} in {PACKAGE_DIR} (the build was for "
            f"{was_for}); " + rebuild_advice(PACKAGE_DIR),
            built,
        )
    try:
        from gradstats import _C
    except (ImportError, OSError) as err:
        raise BuildError(
            f"gradstats._C failed to load ({err}); it was built for {was_for} and {_installed()} "
            "is installed; " + rebuild_advice(PACKAGE_DIR),
            built,
        ) from err
    return _C, built


def main_module(argv: list[str]) -> str | None:
    """The MODULE of `python [options] -m MODULE ...` (argv: sys.orig_argv), else None."""
    words = iter(argv[1:])
    for word in words:
        if word in _LONG_OPTIONS_WITH_VALUE:
            next(words, None)
            continue
        if not word.startswith("-") or word.startswith("--") or word == "-":
            return None  # a script, a long option without a value, or stdin: no -m before it
        for at, flag in enumerate(word[1:], start=1):
            rest = word[at + 1 :]
            if flag == "m":
                return rest or next(words, None)
            if flag == "c":
                return None
            if flag in _OPTIONS_WITH_VALUE:
                if not rest:
                    next(words, None)
                break
    return None


def locating_main_module() -> bool:
    """Whether this import is Python locating gradstats for `python -m gradstats ...`.
    sys.orig_argv exists from Python 3.10; before, the error is raised as for any import."""
    if sys.argv[:1] != [_LOCATING_MAIN]:
        return False
    module = main_module(list(getattr(sys, "orig_argv", [])))
    return module is not None and module.split(".")[0] == PACKAGE_DIR.name


@contextlib.contextmanager
def kept_for_main() -> Iterator[None]:
    """Around the package's imports of the native library: for `python -m gradstats`, a
    BuildError is kept (load_error()) rather than raised, so that `info` can report it."""
    global _load_error
    try:
        yield
    except BuildError as err:
        if not locating_main_module():
            raise
        _load_error = err


def load_error() -> BuildError | None:
    """The BuildError that `python -m gradstats` kept while importing the package (or None)."""
    return _load_error
