"""`python -m gradstats info | bench ...`: the build and this machine, or the benchmark."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from gradstats import bench


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m gradstats", description="gradstats: fused gradient statistics and clipping"
    )
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("info", help="versions, the build and which ops have CPU/CUDA kernels")
    bench_parser = commands.add_parser(
        "bench",
        help="time gradstats against torch.nn.utils on real models' gradient shapes",
        description=bench.DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    bench.add_arguments(bench_parser)
    args = parser.parse_args(argv)
    if args.command == "info":
        print("\n".join(bench.info_lines()))
        return 0
    return bench.run(args)


if __name__ == "__main__":
    sys.exit(main())
