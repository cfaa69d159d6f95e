#!/usr/bin/env bash
# Regenerates benchmarks/results/cpu.json and cpu.png on this machine, then checks the CPU targets.
# Run it on an otherwise idle machine: other processes on the cores distort multi-threaded timings.
# Extra arguments go to the benchmark (e.g. --preset all, --threads 1).
set -euo pipefail
cd "$(dirname "$0")/.."
# targets.py reads the results with gradstats.bench: this checkout's, not another installed one.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
python -m gradstats bench --device cpu --json benchmarks/results/cpu.json \
  --plot benchmarks/results/cpu.png "$@"
python benchmarks/targets.py benchmarks/results/cpu.json
