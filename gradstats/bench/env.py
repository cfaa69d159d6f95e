"""The machine, the versions and the build, for `python -m gradstats info` and the bench header."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import torch

import gradstats

_CPU_CACHE = Path("/sys/devices/system/cpu/cpu0/cache")
_SMI_TIMEOUT_S = 10
# Used when the last-level cache size cannot be read (a generous server L3).
FALLBACK_CACHE_BYTES = 64 << 20
KIB = 1 << 10
_SIZE_SUFFIX = {"K": KIB, "M": 1 << 20, "G": 1 << 30}


def _cpuinfo_field(name: str) -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == name:
                return value.strip()
    except OSError:
        pass
    return None


def cpu_model() -> str:
    return _cpuinfo_field("model name") or platform.processor() or platform.machine()


def physical_cores() -> int:
    """Distinct (package, core) pairs in /proc/cpuinfo; the logical CPU count where unreadable."""
    pairs: set[tuple[str, str]] = set()
    package = core = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key == "physical id":
                package = value.strip()
            elif key == "core id":
                core = value.strip()
                pairs.add((package, core))
    except OSError:
        pass
    return len(pairs) or (os.cpu_count() or 1)


def _parse_size(text: str) -> int:
    text = text.strip()
    unit = _SIZE_SUFFIX.get(text[-1:].upper(), 1)
    digits = text[:-1] if unit != 1 else text
    return int(digits) * unit


def cpu_cache_bytes() -> int:
    """Size of the largest (last-level) CPU cache, from sysfs."""
    best = 0
    for index in sorted(_CPU_CACHE.glob("index*")):
        try:
            if (index / "type").read_text().strip() == "Instruction":
                continue
            best = max(best, _parse_size((index / "size").read_text()))
        except (OSError, ValueError):
            continue
    return best or FALLBACK_CACHE_BYTES


# /proc/stat's cpu line: user nice system idle iowait irq softirq steal ...; idle and iowait are
# the idle ones, steal is time the hypervisor gave to other guests.
_IDLE_FIELDS = (3, 4)
_BUSY_FIELDS_END = 8


def cpu_busy_seconds() -> float | None:
    """CPU seconds used by every process on the machine (all CPUs together), from /proc/stat."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1 : _BUSY_FIELDS_END + 1]
        ticks = [int(v) for i, v in enumerate(fields) if i not in _IDLE_FIELDS]
        return sum(ticks) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


class OtherLoad:
    """Share of the machine's CPU capacity that other processes (and other guests of the
    hypervisor) used between start() and share(): what disturbs timings on a shared machine."""

    def start(self) -> None:
        self.busy = cpu_busy_seconds()
        self.own = time.process_time()
        self.wall = time.perf_counter()

    def share(self) -> float | None:
        busy = cpu_busy_seconds()
        wall = time.perf_counter() - self.wall
        if busy is None or self.busy is None or wall <= 0:
            return None
        others = (busy - self.busy) - (time.process_time() - self.own)
        return max(0.0, others / (wall * (os.cpu_count() or 1)))


def _meminfo_bytes(field: str) -> int | None:
    """A /proc/meminfo field (given there in KiB), in bytes."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * KIB
    except (OSError, ValueError, IndexError):
        pass
    return None


def memory_bytes() -> int | None:
    return _meminfo_bytes("MemTotal")


def free_memory(device: torch.device) -> int | None:
    """Bytes the benchmark can still allocate on the device (None where unknown)."""
    if device.type == "cuda":
        torch.cuda.empty_cache()  # blocks cached by the allocator count as free
        return torch.cuda.mem_get_info(device)[0]
    return _meminfo_bytes("MemAvailable")


def nvidia_driver() -> str | None:
    """The NVIDIA driver version, from nvidia-smi (None where it is missing)."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    try:
        out = subprocess.run(
            [smi, "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=_SMI_TIMEOUT_S,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    lines = out.strip().splitlines()
    return lines[0].strip() if lines else None


def gpu_info(device: torch.device) -> dict[str, Any]:
    props = torch.cuda.get_device_properties(device)
    return {
        "gpu": props.name,
        "gpu_memory_bytes": props.total_memory,
        "gpu_multiprocessors": props.multi_processor_count,
        "gpu_l2_bytes": getattr(props, "L2_cache_size", None),
        "compute_capability": f"{props.major}.{props.minor}",
        "driver": nvidia_driver(),
    }


def cache_bytes(device: torch.device) -> int:
    """The last-level cache of the device that runs the kernels (CPU L3 or GPU L2)."""
    if device.type == "cuda":
        l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0)
        return l2 or FALLBACK_CACHE_BYTES
    return cpu_cache_bytes()


def machine_info(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {
        "cpu": cpu_model(),
        "cpu_cores": physical_cores(),
        "cpu_threads": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cpu_cache_bytes": cpu_cache_bytes(),
        "memory_bytes": memory_bytes(),
        "os": platform.platform(),
    }
    if device.type == "cuda":
        info.update(gpu_info(device))
    return info


def has_cuda_kernels() -> bool:
    """Whether this build registered CUDA kernels (whether or not a GPU is visible)."""
    return "CUDA" in gradstats.kernel_devices()["stats"]


def versions() -> dict[str, Any]:
    built = gradstats.BUILD_INFO
    return {
        "gradstats": gradstats.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "built_for_torch": built["torch"],
        "built_for_cuda": built.get("cuda") or None,
        "cuda_kernels": has_cuda_kernels(),
        "cpu_isa": built["cpu_isa"],
    }


# `info` lines are "label: value", the values in one column.
INFO_LABEL_WIDTH = len("built against: ")


def _info(label: str, value: str) -> str:
    return f"{label + ':':<{INFO_LABEL_WIDTH}}{value}"


def _cpu_line() -> str:
    return _info(
        "CPU",
        f"{cpu_model()}, {physical_cores()} cores, {os.cpu_count()} threads, "
        f"torch uses {torch.get_num_threads()}",
    )


def _installed_line() -> str:
    return _info("installed", f"torch {torch.__version__}, CUDA {torch.version.cuda or 'none'}")


def not_loaded_lines(error: gradstats.BuildError) -> list[str]:
    """What `python -m gradstats info` prints when the native library cannot load: the versions
    it can still read, then what is wrong and what to do (the BuildError's message)."""
    built = error.built
    made_for = (
        f"torch {built['torch']}, CUDA {built.get('torch_cuda', built.get('cuda')) or 'none'}"
        if built
        else "nothing (gradstats is not built)"
    )
    return [
        f"gradstats {gradstats.__version__} ({Path(gradstats.__file__).parent})",
        f"python {platform.python_version()}",
        _info("built against", made_for),
        _installed_line(),
        _info("library", "NOT LOADED"),
        _cpu_line(),
        "",
        f"gradstats cannot load its native library: {error}",
    ]


def info_lines(error: gradstats.BuildError | None = None) -> list[str]:
    """What `python -m gradstats info` prints: versions, build vs installed, kernels, machine; or,
    given the BuildError of a library that cannot load, not_loaded_lines."""
    if error is not None:
        return not_loaded_lines(error)
    v = versions()
    build = gradstats.BUILD_INFO
    cuda_build = (
        f"yes (CUDA {v['built_for_cuda']}, archs {build.get('cuda_archs') or 'default'})"
        if v["cuda_kernels"]
        else "no (CPU-only build)"
    )
    gpu = "no CUDA device visible"
    if torch.cuda.is_available():
        gpu = f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
        driver = nvidia_driver()
        gpu += f", driver {driver}" if driver else ""
    kernels = gradstats.kernel_devices()
    op_width = max(map(len, kernels))
    lines = [
        f"gradstats {v['gradstats']} ({Path(gradstats.__file__).parent})",
        f"python {v['python']}",
        _info(
            "built against", f"torch {v['built_for_torch']}, CUDA {v['built_for_cuda'] or 'none'}"
        ),
        _installed_line(),
        _info("CUDA kernels", cuda_build),
        # import gradstats has checked the ISA against this CPU (gradstats._build).
        _info("CPU kernels", v["cpu_isa"] + (", debug build" if build.get("debug") else "")),
        _info("GPU", gpu),
        _cpu_line(),
        "kernels:",
    ]
    for op, keys in kernels.items():
        lines.append(f"  gradstats::{op:<{op_width}} {', '.join(keys) or 'none'}")
    return lines
