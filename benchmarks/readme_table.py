"""Keeps the README's benchmark tables generated from the committed results.

    PYTHONPATH=. python benchmarks/readme_table.py benchmarks/results/cpu.json            # print it
    PYTHONPATH=. python benchmarks/readme_table.py benchmarks/results/cpu.json --update README.md
    PYTHONPATH=. python benchmarks/readme_table.py benchmarks/results/cpu.json --check README.md

The README holds the block between `<!-- gradstats-bench:NAME -->` and
`<!-- /gradstats-bench:NAME -->`, NAME being the results file's stem (cpu, gpu); --update rewrites
it from the JSON, --check exits 1 when it differs (for CI). Rows the benchmark marked busy (timed
while other processes used the machine) stay out of the table; a line under it names them.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from gradstats.bench.report import markdown, read_json


def block(results: Path) -> str:
    header, rows = read_json(results)
    source = f"Generated from `{results.as_posix()}` by `benchmarks/readme_table.py`."
    return f"{markdown(header, rows)}\n\n{source}"


def markers(name: str) -> tuple[str, str]:
    return f"<!-- gradstats-bench:{name} -->", f"<!-- /gradstats-bench:{name} -->"


def replace_block(text: str, name: str, content: str) -> str:
    start, end = markers(name)
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.DOTALL)
    if not pattern.search(text):
        raise SystemExit(f"no {start} ... {end} block in the README; add one where the table goes")
    return pattern.sub(lambda _: f"{start}\n{content}\n{end}", text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, help="a JSON file written by bench --json")
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--update", type=Path, metavar="README", help="rewrite the block")
    action.add_argument("--check", type=Path, metavar="README", help="exit 1 if it is stale")
    args = parser.parse_args(argv)
    content = block(args.results)
    name = args.results.stem
    if args.update is None and args.check is None:
        print(content)
        return 0
    readme = args.update or args.check
    text = readme.read_text()
    updated = replace_block(text, name, content)
    if args.check is not None:
        if updated != text:
            print(f"{readme}: the {name} table is stale; run {Path(__file__).name} --update")
            return 1
        return 0
    readme.write_text(updated)
    return 0


if __name__ == "__main__":
    sys.exit(main())
