"""python -m gradstats info: how this build was made and which ops have which kernels."""

from __future__ import annotations

import sys

import torch

import gradstats


def info() -> str:
    built = gradstats.BUILD_INFO
    lines = [
        f"gradstats {gradstats.__version__}",
        f"built for torch {built['torch']} (CUDA {built['cuda'] or 'none'}), "
        f"CPU ISA {built['cpu_isa']}",
        f"installed torch {torch.__version__} (CUDA {torch.version.cuda or 'none'})",
        f"CUDA kernels in the build: {'yes' if built['cuda'] else 'no'}",
    ]
    lines += [f"op {name}: {', '.join(keys)}" for name, keys in gradstats.kernel_devices().items()]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    if argv[:1] == ["info"]:
        print(info())
        return 0
    print("usage: python -m gradstats info", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
