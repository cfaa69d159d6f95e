"""CPU features the build and the import both check (no torch import: setup.py loads this file)."""

from __future__ import annotations

from pathlib import Path

AVX2_FLAGS = ("avx2", "fma", "f16c")


def cpu_flags() -> set[str]:
    """The feature flags of this machine's CPU, from /proc/cpuinfo (empty where unavailable)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def has_avx2() -> bool:
    return all(flag in cpu_flags() for flag in AVX2_FLAGS)
