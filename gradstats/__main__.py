"""`python -m gradstats info | bench ...`: the build and this machine, or the benchmark.

`info` works when the native library cannot load (another torch, a missing binary): it says what
is wrong and how to rebuild, and exits with EXIT_NOT_LOADED. `bench` parses its own arguments, so
that a wrong flag prints the bench's usage.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from gradstats import bench
from gradstats._build import load_error
from gradstats.bench import env

BENCH = "bench"
# The exit status of `info` (and of `bench`) when the native library cannot load.
EXIT_NOT_LOADED = 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m gradstats", description="gradstats: fused gradient statistics and clipping"
    )
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("info", help="versions, the build and which ops have CPU/CUDA kernels")
    commands.add_parser(
        BENCH,
        help="time gradstats against torch.nn.utils on real models' gradient shapes "
        "(python -m gradstats bench -h for its options)",
        add_help=False,
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] != [BENCH]:
        _parser().parse_args(argv)  # info, or the usage
    error = load_error()
    if error is not None:
        print("\n".join(env.info_lines(error)))
        if argv[:1] == [BENCH]:
            print(
                "\ngradstats bench needs the native library: fix the build first", file=sys.stderr
            )
        return EXIT_NOT_LOADED
    if argv[:1] == [BENCH]:
        return bench.main(argv[1:])
    print("\n".join(env.info_lines()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
