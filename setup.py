"""Build gradstats._C against the torch that is already installed.

    pip install --no-build-isolation --config-settings editable_mode=compat -e .
    pip wheel --no-build-isolation --no-deps -w DIR .     (the wheel requires this torch)

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

import contextlib
import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import threading
from collections.abc import Iterator
from pathlib import Path

from setuptools import setup

try:
    from setuptools.command.bdist_wheel import bdist_wheel
except ImportError:  # setuptools < 70.1 kept it in the wheel package
    from wheel.bdist_wheel import bdist_wheel

ROOT = Path(__file__).parent.resolve()
# What a source install (an sdist, an editable install) requires: the oldest torch CI tests (the
# GPU machine's 2.11) up to the newest it builds against. A wheel requires the torch it was built
# against instead (wheel_torch_requirement).
SOURCE_REQUIREMENTS = ["torch>=2.11", "numpy"]
# Where ./run's in-place build, `pip wheel .` and pip's editable install all keep the objects
# (setuptools' usual folder; its editable install would otherwise compile into a fresh temporary
# folder, everything again), so that ninja recompiles only what changed.
BUILD_TEMP = ROOT / "build" / f"temp.{sysconfig.get_platform()}-{sys.implementation.cache_tag}"
# Seconds between "still compiling" lines while one source compiles (./run's pip steps tick alike),
# and how many looks at the running compilers per tick (each line comes at most a look late).
COMPILE_TICK_S = 15
LOOKS_PER_TICK = 3
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


def _package_module(name: str):
    """gradstats/NAME.py, loaded without importing the package (which needs the built library)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "gradstats" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def cpu_has_avx2() -> bool:
    return _package_module("_cpuinfo").has_avx2()


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
        install = _package_module("_install")
        raise SystemExit(
            "gradstats builds against the torch you run, and none is importable here. If torch is "
            "installed, pip's build isolation hid it: install with\n"
            f"    {install.REGULAR}\n"
            f"(or `{install.EDITABLE}` for development; `{install.IN_PLACE}` builds in place). "
            "Otherwise install torch first (pip install torch)."
        ) from None
    return torch


def wheel_torch_requirement(version: str) -> str:
    """The torch a wheel built against torch `version` (as pip sees it) requires: that release,
    with its flavour where pip can tell it.

    A CUDA build's local label (+cu130) cannot be required: PyPI's torch wheels are CUDA builds
    without a label (pip sees PyPI's 2.14.1, CUDA 13.0, as plain 2.14.1) and PyPI hosts no labelled
    versions, so torch==2.14.1+cu130 would refuse the very binary the wheel was built against and
    send pip looking for one that only PyTorch's own index has. The CUDA version is checked at
    import instead (gradstats._build). Other labels are kept: +cpu builds exist only on PyTorch's
    index, always labelled, so requiring +cpu refuses just the CUDA builds of the same release,
    which a CPU build does not fit; a source build's label (+git...) names its own ABI.
    """
    release, _, label = version.partition("+")
    return f"torch=={release}" if label.startswith("cu") else f"torch=={version}"


def installed_torch_version(torch) -> str:
    """The installed torch's version as pip sees it (PyPI's CUDA build says 2.14.1 to pip and
    2.14.1+cu130 to torch.__version__)."""
    try:
        return importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:  # torch from a source tree on sys.path
        return torch.__version__


def pinned_requirements(torch_requirement: str) -> list[str]:
    """SOURCE_REQUIREMENTS with torch's range replaced by torch_requirement."""
    return [
        torch_requirement if re.match(r"torch\b", requirement) else requirement
        for requirement in SOURCE_REQUIREMENTS
    ]


def wheel_command(torch_requirement: str) -> type:
    """bdist_wheel, with the wheel's metadata requiring torch_requirement: its binary loads only
    into that torch. Source installs (sdist, editable) keep SOURCE_REQUIREMENTS."""

    class PinnedTorchWheel(bdist_wheel):
        def finalize_options(self) -> None:
            # pip prepares one metadata for wheels and editable installs alike (with the source
            # range), and setuptools would copy it into the wheel (--dist-info-dir): the wheel
            # writes its own. pip checks a built wheel's name and version against the prepared
            # metadata, not its requirements.
            self.dist_info_dir = None
            super().finalize_options()

        def run(self) -> None:
            requirements = pinned_requirements(torch_requirement)
            self.distribution.install_requires = requirements
            self.distribution.metadata.install_requires = requirements
            super().run()

    return PinnedTorchWheel


# /proc/PID/stat fields after "(name) ": the state (3rd field), the parent's pid (4th), ... the
# start time in clock ticks since boot (22nd).
_STAT_PPID = 1
_STAT_STARTTIME = 19


def _processes() -> dict[int, tuple[int, float, list[str]]]:
    """pid: (parent pid, start in seconds since boot, argv) of each process /proc lets us read."""
    ticks = os.sysconf("SC_CLK_TCK")
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            argv = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # after the name, which may hold spaces
        parent, start = int(fields[_STAT_PPID]), int(fields[_STAT_STARTTIME]) / ticks
        found[int(entry.name)] = (parent, start, argv)
    return found


def compiling_sources(sources: dict[str, str], root_pid: int) -> dict[str, float]:
    """{label: seconds} of the sources ({absolute path: label}) that processes under root_pid are
    compiling now, timed from the oldest process that names each; {} where /proc is missing."""
    try:
        processes = _processes()
        uptime = float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, ValueError):
        return {}
    children: dict[int, list[int]] = {}
    for pid, (parent, _, _) in processes.items():
        children.setdefault(parent, []).append(pid)
    started: dict[str, float] = {}
    pending = list(children.get(root_pid, ()))
    while pending:
        pid = pending.pop()
        pending += children.get(pid, ())
        _, start, argv = processes[pid]
        for path, label in sources.items():
            if any(path in word for word in argv):
                started[label] = min(start, started.get(label, start))
    return {label: uptime - start for label, start in started.items()}


@contextlib.contextmanager
def compile_heartbeat(sources: dict[str, str], tick_s: float = COMPILE_TICK_S) -> Iterator[None]:
    """While the body runs, a line for each source each time its compile has run another tick_s."""
    stop = threading.Event()
    ticks_said: dict[str, int] = {}

    def beat() -> None:
        while not stop.wait(tick_s / LOOKS_PER_TICK):
            for label, seconds in sorted(compiling_sources(sources, os.getpid()).items()):
                ticks = int(seconds // tick_s)
                if ticks > ticks_said.get(label, 0):
                    ticks_said[label] = ticks
                    print(f"gradstats build: still compiling {label} ({seconds:.0f} s)", flush=True)

    thread = threading.Thread(target=beat, name="compile-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def build_ext_command(torch_build_ext: type) -> type:
    """torch's BuildExtension, keeping its objects in BUILD_TEMP and saying which source is still
    compiling every COMPILE_TICK_S."""

    class BuildExt(torch_build_ext):
        def finalize_options(self) -> None:
            super().finalize_options()
            self.build_temp = str(BUILD_TEMP)

        def build_extensions(self) -> None:
            sources = {
                str((ROOT / source).resolve()): source
                for ext in self.extensions
                for source in ext.sources
            }
            with compile_heartbeat(sources):
                super().build_extensions()

    return BuildExt


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
        # The CUDA of the torch built against, whether or not CUDA kernels were built: the binary
        # loads only into a torch of the same release and CUDA (gradstats._build).
        "torch_cuda": torch.version.cuda,
        "cuda": torch.version.cuda if toolkit else None,
        "cuda_home": toolkit,
        "cuda_archs": os.environ.get("TORCH_CUDA_ARCH_LIST") if toolkit else None,
        "cpu_isa": cpu_isa,
        "debug": debug,
        "sanitize": sanitize or None,
    }
    (ROOT / "gradstats" / "_build_info.json").write_text(json.dumps(info, indent=2) + "\n")
    commands = {
        "build_ext": build_ext_command(cpp_extension.BuildExtension.with_options(use_ninja=True)),
        "bdist_wheel": wheel_command(wheel_torch_requirement(installed_torch_version(torch))),
    }
    return ext, commands


if __name__ == "__main__":  # setuptools runs this file as __main__; tests import its functions
    ext, commands = build_extension()
    setup(ext_modules=[ext], cmdclass=commands, install_requires=SOURCE_REQUIREMENTS)
