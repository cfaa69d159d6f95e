"""Build gradstats._C against the torch that is already installed.

    pip install --no-build-isolation -e .

Environment switches (all optional):
  GRADSTATS_CUDA=auto|0|1      build the CUDA kernels: auto (default) when a CUDA build of torch
                               and a CUDA toolkit (nvcc) are both present; never decided from an
                               attached GPU
  GRADSTATS_CUDA_ARCHS="8.0;9.0+PTX"
                               GPU architectures to compile for (TORCH_CUDA_ARCH_LIST syntax;
                               it overrides TORCH_CUDA_ARCH_LIST); 7.0 or newer, with nvcc >= 12.1
  GRADSTATS_CPU_ISA=auto|avx2|default
                               SIMD level of the CPU kernels: auto (default) uses AVX2+FMA+F16C
                               when the building machine has them; the import checks that the
                               running machine has them too
  GRADSTATS_DEBUG=1            -O0 -g, for debugging the kernels
  GRADSTATS_SANITIZE=address   the C++ built with AddressSanitizer (-fsanitize=address); run Python
                               with LD_PRELOAD="$(gcc -print-file-name=libasan.so)" and
                               ASAN_OPTIONS=detect_leaks=0 (Python itself is not instrumented)
  GRADSTATS_PTXAS_VERBOSE=1    print register and spill counts of every CUDA kernel (-Xptxas -v)
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).parent.resolve()
DEFAULT_CUDA_ARCHS = "8.0;9.0+PTX"
# The large launch table passes ~32 KB of kernel parameters (csrc/cuda/planner.h kMaxParamBytes):
# CUDA 12.1 and compute capability 7.0 (Volta) are the first to allow more than 4 KB.
MIN_CUDA_ARCH = (7, 0)
MIN_NVCC = (12, 1)
# TORCH_CUDA_ARCH_LIST may name architectures; these are the ones older than MIN_CUDA_ARCH.
_OLD_ARCH_NAMES = ("kepler", "maxwell", "pascal")


def _env(name: str, default: str) -> str:
    return os.environ.get(f"GRADSTATS_{name}", default).strip().lower()


def _is_toolkit(path: str | None) -> bool:
    if not path:
        return False
    root = Path(path)
    has_nvcc = (root / "bin" / "nvcc").exists()
    has_cudart = any(
        (root / lib / "libcudart.so").exists()
        for lib in ("lib64", "lib", "targets/x86_64-linux/lib", "targets/sbsa-linux/lib")
    )
    return has_nvcc and has_cudart


def find_cuda_toolkit() -> str | None:
    """The toolkit folder holding bin/nvcc and libcudart.

    torch guesses CUDA_HOME as the parent of the first `nvcc` on PATH, which is wrong when that nvcc
    is a wrapper outside the toolkit; check each candidate for the files the link actually needs.
    """
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(str(Path(nvcc).resolve().parent.parent))
    candidates += [
        "/usr/local/cuda",
        *sorted(map(str, Path("/usr/local").glob("cuda-*")), reverse=True),
    ]
    return next((c for c in candidates if _is_toolkit(c)), None)


def cpu_has_avx2() -> bool:
    spec = importlib.util.spec_from_file_location("_cpuinfo", ROOT / "gradstats" / "_cpuinfo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.has_avx2()


def decide_cuda(torch_cuda: str | None) -> str | None:
    """Returns the toolkit folder to build with, or None for a CPU-only build."""
    mode = _env("CUDA", "auto")
    if mode not in ("auto", "0", "1"):
        raise SystemExit(f"GRADSTATS_CUDA must be auto, 0 or 1; got {mode!r}")
    if mode == "0":
        return None
    toolkit = find_cuda_toolkit()
    if mode == "1" and (torch_cuda is None or toolkit is None):
        raise SystemExit(
            "GRADSTATS_CUDA=1 but "
            + ("the installed torch is a CPU build" if torch_cuda is None else "no CUDA toolkit")
            + " was found; install a CUDA build of torch and set CUDA_HOME to the toolkit folder"
        )
    return toolkit if torch_cuda is not None else None


def _version(text: str) -> tuple[int, int]:
    major, minor = re.match(r"(\d+)\.(\d+)", text).groups()
    return int(major), int(minor)


def decide_cuda_archs(toolkit: str) -> str:
    """The architectures to compile for: GRADSTATS_CUDA_ARCHS, else TORCH_CUDA_ARCH_LIST, else the
    default. Stops at once, saying what to do, when nvcc or an architecture is too old for the
    kernels' 32 KB parameter tables (rather than failing deep in nvcc with "formal parameter space
    overflowed")."""
    source = next(
        (name for name in ("GRADSTATS_CUDA_ARCHS", "TORCH_CUDA_ARCH_LIST") if os.environ.get(name)),
        None,
    )
    archs = os.environ[source] if source else DEFAULT_CUDA_ARCHS
    fix = (
        f"set GRADSTATS_CUDA_ARCHS to architectures >= {MIN_CUDA_ARCH[0]}.{MIN_CUDA_ARCH[1]} "
        f'(e.g. GRADSTATS_CUDA_ARCHS="{DEFAULT_CUDA_ARCHS}"; it overrides TORCH_CUDA_ARCH_LIST), '
        "or build without CUDA: GRADSTATS_CUDA=0"
    )
    too_old = [
        entry
        for entry in re.split(r"[;\s]+", archs.strip())
        if entry
        and (
            entry.lower().startswith(_OLD_ARCH_NAMES)
            or (entry[0].isdigit() and _version(entry) < MIN_CUDA_ARCH)
        )
    ]
    if too_old:
        raise SystemExit(
            f"gradstats: {source or 'the default'} asks for CUDA architectures {', '.join(too_old)}"
            f" (from {archs!r}); the kernels need compute capability >= {MIN_CUDA_ARCH[0]}."
            f"{MIN_CUDA_ARCH[1]} (they pass up to 32 KB of kernel parameters): {fix}"
        )
    output = subprocess.run(
        [str(Path(toolkit) / "bin" / "nvcc"), "--version"], capture_output=True, text=True
    ).stdout
    release = re.search(r"release (\d+\.\d+)", output)
    if release and _version(release.group(1)) < MIN_NVCC:
        raise SystemExit(
            f"gradstats: the CUDA toolkit in {toolkit} is release {release.group(1)}; the kernels "
            f"need nvcc >= {MIN_NVCC[0]}.{MIN_NVCC[1]} (kernel parameters up to 32 KB): point "
            "CUDA_HOME at a newer toolkit, or build without CUDA: GRADSTATS_CUDA=0"
        )
    return archs


def decide_cpu_isa() -> str:
    mode = _env("CPU_ISA", "auto")
    if mode not in ("auto", "avx2", "default"):
        raise SystemExit(f"GRADSTATS_CPU_ISA must be auto, avx2 or default; got {mode!r}")
    if mode == "auto":
        return "avx2" if cpu_has_avx2() else "default"
    return mode


def import_torch():
    """The torch to build against: the one installed where this runs. pip's build isolation (plain
    `pip install .`) runs setup.py in a fresh environment without it; say so once and stop."""
    try:
        import torch
    except ModuleNotFoundError:
        raise SystemExit(
            "gradstats builds against the torch you run, and none is importable here. If torch is "
            "installed, pip's build isolation hid it: install with\n"
            "    pip install --no-build-isolation .\n"
            "(or `pip install --no-build-isolation -e .` for development; `./run test` builds in "
            "place). Otherwise install torch first (pip install torch)."
        ) from None
    return torch


def build_extension():
    torch = import_torch()

    toolkit = decide_cuda(torch.version.cuda)
    if toolkit:
        # torch.utils.cpp_extension reads CUDA_HOME when it is imported.
        os.environ["CUDA_HOME"] = toolkit
        os.environ["TORCH_CUDA_ARCH_LIST"] = decide_cuda_archs(toolkit)
    from torch.utils import cpp_extension

    cpu_isa = decide_cpu_isa()
    debug = _env("DEBUG", "0") == "1"
    opt = ["-O0", "-g"] if debug else ["-O3"]
    sanitize = _env("SANITIZE", "")
    if sanitize not in ("", "address"):
        raise SystemExit(f"GRADSTATS_SANITIZE must be address (or unset); got {sanitize!r}")
    sanitizers = ["-fsanitize=address", "-fno-omit-frame-pointer"] if sanitize else []
    cxx = [*opt, *sanitizers, "-fopenmp", "-Wall", "-Wno-psabi"]
    if cpu_isa == "avx2":
        cxx += ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]
    sources = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").rglob("*.cpp"))
    kwargs = dict(
        name="gradstats._C",
        sources=sources,
        include_dirs=[str(ROOT / "csrc")],
        extra_link_args=["-fopenmp", *sanitizers],
    )
    if toolkit:
        sources += sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").rglob("*.cu"))
        nvcc = [*opt, "-lineinfo", "-DGRADSTATS_WITH_CUDA"]
        if _env("PTXAS_VERBOSE", "0") == "1":
            nvcc.append("-Xptxas=-v")
        ext = cpp_extension.CUDAExtension(
            extra_compile_args={"cxx": [*cxx, "-DGRADSTATS_WITH_CUDA"], "nvcc": nvcc}, **kwargs
        )
    else:
        ext = cpp_extension.CppExtension(extra_compile_args={"cxx": cxx}, **kwargs)

    info = {
        "torch": torch.__version__,
        "cuda": torch.version.cuda if toolkit else None,
        "cuda_home": toolkit,
        "cuda_archs": os.environ.get("TORCH_CUDA_ARCH_LIST") if toolkit else None,
        "cpu_isa": cpu_isa,
        "debug": debug,
        "sanitize": sanitize or None,
    }
    (ROOT / "gradstats" / "_build_info.json").write_text(json.dumps(info, indent=2) + "\n")
    return ext, cpp_extension.BuildExtension.with_options(use_ninja=True)


if __name__ == "__main__":  # setuptools runs this file as __main__; tests import its functions
    ext, build_ext = build_extension()
    setup(ext_modules=[ext], cmdclass={"build_ext": build_ext})
