"""Loads the native library gradstats._C, with errors that say what the build was made for."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from gradstats._cpuinfo import has_avx2

_BUILD_INFO = Path(__file__).with_name("_build_info.json")
_REBUILD = "rebuild it against the installed torch: pip install --no-build-isolation -e ."


class BuildError(ImportError):
    """gradstats._C is missing or was built for another torch, CUDA or CPU."""


def _installed() -> str:
    return f"torch {torch.__version__} (CUDA {torch.version.cuda or 'none'})"


def load_library() -> tuple[Any, dict[str, Any]]:
    """Imports gradstats._C (registering torch.ops.gradstats); returns it and its build info."""
    if not _BUILD_INFO.exists():
        raise BuildError(f"gradstats is not built (no {_BUILD_INFO.name}); {_REBUILD}")
    built = json.loads(_BUILD_INFO.read_text())
    if built["torch"] != torch.__version__:
        raise BuildError(
            f"gradstats was built for torch {built['torch']} (CUDA {built['cuda'] or 'none'}) "
            f"but {_installed()} is installed; {_REBUILD}"
        )
    if built["cpu_isa"] == "avx2" and not has_avx2():
        raise BuildError(
            "gradstats was built with AVX2/FMA/F16C CPU kernels but this CPU lacks them; "
            f"rebuild with GRADSTATS_CPU_ISA=default: {_REBUILD.split(': ')[1]}"
        )
    try:
        from gradstats import _C
    except (ImportError, OSError) as err:
        raise BuildError(
            f"gradstats._C failed to load ({err}); it was built for torch {built['torch']} "
            f"(CUDA {built['cuda'] or 'none'}) and {_installed()} is installed; {_REBUILD}"
        ) from err
    return _C, built
