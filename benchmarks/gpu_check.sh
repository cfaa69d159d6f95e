#!/usr/bin/env bash
# The whole GPU check of gradstats, for a fresh machine with a GPU, torch, nvcc and no network:
#   a preflight that stops with one line when something the check needs is missing (Python
#   packages, a CUDA build of torch whose CUDA major nvcc matches, a visible GPU); the build
#   (setup.py build_ext --inplace, MAX_JOBS=16, sm_90 only unless GRADSTATS_CUDA_ARCHS says
#   otherwise); the GPU tests (tests/test_cuda.py and the suite's cuda cases); compute-sanitizer
#   memcheck / racecheck / synccheck / initcheck on a small statistics-plus-clipping program (after
#   a negative control proving that the kernel filter instruments our kernels); a stress of two
#   streams and CUDA graph replays with the statistics kernel's tail timings
#   (benchmarks/gpu_stress.py); and a reduced GPU benchmark (gpt2-small, many-tiny and many-medium
#   in bfloat16, gpt2-small in float32). Every step has a timeout and the whole check stays within
#   CHECK_BUDGET_S (under 8 minutes on an H200); a benchmark that runs out of time is noted, not
#   failed. A one-screen table is printed last.
#
#   bash benchmarks/gpu_check.sh [RESULTS]
#
# Results go to RESULTS, else to $OUT when set (the device tool brings $OUT back: at most 8 files),
# else to out/gpu_check: summary.txt, env.txt, ptxas.txt, the benchmark and stress JSON, and every
# log packed in logs.tar.gz.
#
# Exit status: 0 when every step that ran passed, 1 otherwise (a missing sanitizer is reported,
# not failed), 2 when the preflight stopped the check.
set -u -o pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
RESULTS=${1:-${OUT:-$ROOT/out/gpu_check}}
if [[ $# -gt 1 ]]; then
  echo "usage: $0 [RESULTS]" >&2
  exit 2
fi
RESULTS=$(mkdir -p "$RESULTS" && cd "$RESULTS" && pwd) || exit 2
cd "$ROOT" || exit 2
PY=${PYTHON:-python3}
# The logs, packed into RESULTS/logs.tar.gz at the end (or when the check is stopped).
LOGS=$(mktemp -d)

# Wall-clock budget of the whole check, seconds: under 8 minutes with room for the table.
CHECK_BUDGET_S=${CHECK_BUDGET_S:-460}
# Per-step limits, seconds; a step also never runs past the budget.
BUILD_TIMEOUT_S=240
TESTS_TIMEOUT_S=150
MEMCHECK_TIMEOUT_S=90
RACECHECK_TIMEOUT_S=90
SYNCCHECK_TIMEOUT_S=60
INITCHECK_TIMEOUT_S=90
CONTROL_TIMEOUT_S=60
STRESS_TIMEOUT_S=90
BENCH_BF16_TIMEOUT_S=90
BENCH_FP32_TIMEOUT_S=45
# Kept for the benchmark while the steps before it run: its numbers are what the README reports.
BENCH_RESERVE_S=75
# A step that would get less time than this is skipped rather than started.
MIN_STEP_S=20
# compute-sanitizer exits with this when it found errors (any value the program cannot return).
SANITIZER_ERROR_EXIT=86
# The sanitizers instrument only kernels whose name holds this (csrc/cuda/kernels.cuh).
KERNEL_FILTER="kns=gradstats_"
# The benchmark's bandwidth scenarios (gradstats/bench/cases.py BANDWIDTH_SCENARIOS): the
# host-overhead one measures the CPU side, which this check does not need.
BENCH_SCENARIOS=(stats clip-noop clip adamw-step)
# Parallel compile jobs (the H200 machine has 16 cores).
export MAX_JOBS=${MAX_JOBS:-16}

# shellcheck disable=SC2317  # called by the EXIT trap
pack_logs() {
  tar -czf "$RESULTS/logs.tar.gz" -C "$LOGS" . 2>/dev/null
  rm -rf "$LOGS"
}
trap pack_logs EXIT
trap 'exit 1' INT TERM

START=$(date +%s)
STEPS=()
STATUS=()
SECONDS_TAKEN=()
DETAILS=()
FAILED=0

remaining() { echo $((CHECK_BUDGET_S - ($(date +%s) - START))); }

record() {  # name status seconds detail
  STEPS+=("$1")
  STATUS+=("$2")
  SECONDS_TAKEN+=("$3")
  DETAILS+=("$4")
  [[ "$2" == "FAIL" || "$2" == "TIMEOUT" ]] && FAILED=1
  return 0
}

# The one line the preflight stops with.
stop() {
  echo "gpu_check: preflight: $1" | tee "$RESULTS/summary.txt"
  exit 2
}

# run_step NAME LIMIT_S LOG CMD...: runs CMD under a timeout (the smaller of LIMIT_S and what is
# left of the budget less RESERVE_S), its output in LOG; sets STEP_RC and STEP_S.
RESERVE_S=$BENCH_RESERVE_S
run_step() {
  local name=$1 limit=$2 log=$3
  shift 3
  local left
  left=$(($(remaining) - 5 - RESERVE_S))
  ((left < limit)) && limit=$left
  if ((limit < MIN_STEP_S)); then
    STEP_RC=-1
    STEP_S=0
    echo "skipped: out of time budget" >"$log"
    return
  fi
  echo "== $name (limit ${limit}s): $*" | tee -a "$LOGS/check.log"
  local t0
  t0=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" >"$log" 2>&1
  STEP_RC=$?
  STEP_S=$(($(date +%s) - t0))
}

status_of() {  # rc -> status word
  case $1 in
    0) echo ok ;;
    -1) echo SKIPPED ;;
    124 | 137) echo TIMEOUT ;;
    *) echo FAIL ;;
  esac
}

: >"$LOGS/check.log"

# ---- environment ---------------------------------------------------------------------------
# A toolkit folder holds bin/nvcc and libcudart (the nvcc on PATH may be a wrapper outside it).
is_toolkit() {
  [[ -x "$1/bin/nvcc" ]] && compgen -G "$1/@(lib64|lib|targets/*/lib)/libcudart.so" >/dev/null
}
shopt -s extglob
if [[ -z "${CUDA_HOME:-}" ]]; then
  NVCC_ON_PATH=$(command -v nvcc || true)
  for candidate in ${CUDA_PATH:-} ${NVCC_ON_PATH:+"$(dirname "$(dirname "$(readlink -f "$NVCC_ON_PATH")")")"} \
    /usr/local/cuda /usr/local/cuda-*; do
    if is_toolkit "$candidate"; then
      export CUDA_HOME=$candidate
      break
    fi
  done
fi
export PATH="${CUDA_HOME:+$CUDA_HOME/bin:}$PATH"
{
  echo "date: $(date -u +%FT%TZ)"
  echo "repo: $ROOT ($(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown))"
  echo "CUDA_HOME: ${CUDA_HOME:-not found}"
  nvcc --version 2>&1 | tail -2
  nvidia-smi -L 2>&1
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'devices', torch.cuda.device_count(), torch.cuda.get_device_name(0) if torch.cuda.is_available() \
else 'no GPU')" 2>&1
} >"$RESULTS/env.txt"

# ---- preflight -----------------------------------------------------------------------------
# What would otherwise fail late or obscurely: pytest without hypothesis aborts its collection (no
# GPU test runs), import gradstats needs numpy, a build without ninja is serial and overruns its
# limit, an nvcc of another CUDA major than torch's builds an extension that cannot load.
MISSING=$("$PY" - <<'PYEOF' 2>/dev/null
import importlib.util
missing = [n for n in ("torch", "numpy", "pytest", "hypothesis") if importlib.util.find_spec(n) is None]
if "torch" not in missing:
    from torch.utils.cpp_extension import is_ninja_available
    if not is_ninja_available():
        missing.append("ninja")
print(" ".join(missing))
PYEOF
) || stop "$PY does not run (PYTHON names the interpreter to use)"
[[ -z "$MISSING" ]] || stop "missing Python packages: $MISSING (install them for $PY, then rerun)"
TORCH_CUDA=$("$PY" -c "import torch; print(torch.version.cuda or '')" 2>/dev/null)
[[ -n "$TORCH_CUDA" ]] || stop "torch is a CPU build (torch.version.cuda is None); install a CUDA build"
command -v nvcc >/dev/null || stop "no nvcc (set CUDA_HOME to the CUDA toolkit folder)"
NVCC_VERSION=$(nvcc --version | sed -nE 's/.*release ([0-9]+\.[0-9]+).*/\1/p')
[[ "${NVCC_VERSION%%.*}" == "${TORCH_CUDA%%.*}" ]] ||
  stop "nvcc is CUDA $NVCC_VERSION but torch was built with CUDA $TORCH_CUDA: their majors must match"
"$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.device_count() > 0 else 1)" 2>/dev/null ||
  stop "no GPU visible to torch (torch.cuda.device_count() is 0)"
GPU_NAME=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)

# ---- build ---------------------------------------------------------------------------------
export GRADSTATS_CUDA=1 GRADSTATS_PTXAS_VERBOSE=1
export GRADSTATS_CUDA_ARCHS=${GRADSTATS_CUDA_ARCHS:-9.0}
run_step build "$BUILD_TIMEOUT_S" "$LOGS/build.log" "$PY" setup.py build_ext --inplace
BUILD_RC=$STEP_RC
# Register and spill counts of every kernel (-Xptxas -v), for the closing note.
grep -E "Compiling entry function|Used [0-9]+ registers|spill" "$LOGS/build.log" 2>/dev/null \
  | sed -E 's/.*Compiling entry function .(_Z[^ ]*). for .(sm_[0-9]+)./\2 \1/; s/^ *ptxas info *: *//' \
  >"$RESULTS/ptxas.txt" || true
KERNELS=$(grep -c "Used" "$RESULTS/ptxas.txt" 2>/dev/null)
SPILLS=$(grep -E "spill" "$RESULTS/ptxas.txt" | grep -vc " 0 bytes spill stores, 0 bytes spill loads" || true)
MAXREG=$(grep -oE "Used [0-9]+ registers" "$RESULTS/ptxas.txt" | awk '{print $2}' | sort -n | tail -1)
# Stack frames: a table passed by value and indexed dynamically could be copied to the stack.
STACKS=$(grep -oE "[0-9]+ bytes stack frame" "$RESULTS/ptxas.txt" | grep -vc "^0 bytes" || true)
record build "$(status_of "$BUILD_RC")" "$STEP_S" \
  "${KERNELS:-0} kernels, max ${MAXREG:-?} registers, ${SPILLS:-0} functions with spills, ${STACKS:-0} with stack frames (ptxas.txt)"

# This checkout first: the in-place build put the extension in it.
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
IMPORT_OK=0
if [[ $BUILD_RC -eq 0 ]]; then
  "$PY" -c "import gradstats as g, sys; print(g.__file__, g.BUILD_INFO, g.kernel_devices()); \
sys.exit(0 if all('CUDA' in k for k in g.kernel_devices().values()) else 1)" \
    >"$LOGS/import.log" 2>&1 && IMPORT_OK=1
  [[ $IMPORT_OK -eq 1 ]] || record import FAIL 0 "no CUDA kernels registered (import.log)"
fi

# ---- GPU tests -----------------------------------------------------------------------------
pytest_detail() {  # the pytest summary line of a log
  grep -E "[0-9]+ (passed|failed|errors?|skipped)" "$1" | tail -1 | sed -E 's/=+//g; s/^ +| +$//g'
}
if [[ $IMPORT_OK -eq 1 ]]; then
  run_step gpu-tests "$TESTS_TIMEOUT_S" "$LOGS/pytest_gpu.log" \
    "$PY" -m pytest -m gpu -q -rfEs --durations=15 --junitxml="$LOGS/pytest_gpu.xml" tests
  record "gpu tests" "$(status_of "$STEP_RC")" "$STEP_S" "$(pytest_detail "$LOGS/pytest_gpu.log")"
else
  record "gpu tests" SKIPPED 0 "build or import failed"
fi

# ---- compute-sanitizer ---------------------------------------------------------------------
SANITIZER=$(command -v compute-sanitizer || true)
for candidate in "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer" \
  "${CUDA_HOME:-/usr/local/cuda}/compute-sanitizer/compute-sanitizer"; do
  [[ -z "$SANITIZER" && -x "$candidate" ]] && SANITIZER=$candidate
done

sanitize() {  # tool limit "NAME=value ..." extra-args...: the environment, space-separated
  local tool=$1 limit=$2 assignments
  read -ra assignments <<<"$3"
  shift 3
  local log="$LOGS/sanitizer_$tool.log"
  local common=(--tool "$tool" --error-exitcode "$SANITIZER_ERROR_EXIT" --report-api-errors no "$@")
  # Only the gradstats kernels are instrumented (torch's own are not ours to check, and slow).
  # Their names carry "gradstats_" in both mangled and demangled form; the control step below
  # proves that the filter instruments them.
  run_step "$tool" "$limit" "$log" env "${assignments[@]}" "$SANITIZER" "${common[@]}" \
    --kernel-name "$KERNEL_FILTER" "$PY" benchmarks/sanitize_case.py
  local summary
  summary=$(grep -E "ERROR SUMMARY|RACECHECK SUMMARY" "$log" | tail -1 | sed -E 's/^=+ *//')
  grep -q "sanitize_case: ok" "$log" || summary="$summary; program did not finish ok"
  record "$tool" "$(status_of "$STEP_RC")" "$STEP_S" "${summary:-see sanitizer_$tool.log}"
}

if [[ $IMPORT_OK -ne 1 ]]; then
  record sanitizers SKIPPED 0 "build or import failed"
elif [[ -z "$SANITIZER" ]]; then
  record sanitizers MISSING 0 "compute-sanitizer not found in PATH or CUDA_HOME"
else
  # Negative control: a planted out-of-bounds read in gradstats_stats_kernel must be reported
  # under the same filter; a filter that matched nothing would pass every tool below unchecked.
  CONTROL_LOG="$LOGS/sanitizer_control.log"
  run_step control "$CONTROL_TIMEOUT_S" "$CONTROL_LOG" env PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
    "$SANITIZER" --tool memcheck --error-exitcode "$SANITIZER_ERROR_EXIT" --report-api-errors no \
    --leak-check no --kernel-name "$KERNEL_FILTER" "$PY" benchmarks/sanitize_case.py --plant-out-of-bounds
  if [[ $STEP_RC -eq $SANITIZER_ERROR_EXIT ]] && grep -q "gradstats_stats_kernel" "$CONTROL_LOG"; then
    record control ok "$STEP_S" "planted read reported in gradstats_stats_kernel: the filter works"
  else
    record control FAIL "$STEP_S" "planted read NOT reported (rc $STEP_RC): the kernel filter instruments nothing"
  fi
  # Without the caching allocator every tensor is its own allocation: memcheck then sees
  # accesses past a tensor's end, not only past a cached block's.
  # GRADSTATS_SANITIZER tells sanitize_case.py which tool watches (initcheck leaves out the cases
  # whose inputs only a torch kernel writes).
  uncached="PYTORCH_NO_CUDA_MEMORY_CACHING=1"
  sanitize memcheck "$MEMCHECK_TIMEOUT_S" "$uncached GRADSTATS_SANITIZER=memcheck" --leak-check no
  sanitize racecheck "$RACECHECK_TIMEOUT_S" "GRADSTATS_SANITIZER=racecheck" --racecheck-report hazard
  sanitize synccheck "$SYNCCHECK_TIMEOUT_S" "GRADSTATS_SANITIZER=synccheck"
  sanitize initcheck "$INITCHECK_TIMEOUT_S" "$uncached GRADSTATS_SANITIZER=initcheck"
fi

# ---- stress and tail timings ---------------------------------------------------------------
if [[ $IMPORT_OK -ne 1 ]]; then
  record stress SKIPPED 0 "build or import failed"
else
  run_step stress "$STRESS_TIMEOUT_S" "$LOGS/stress.log" \
    "$PY" benchmarks/gpu_stress.py --json "$RESULTS/stress.json"
  record stress "$(status_of "$STEP_RC")" "$STEP_S" "two streams, graph replays, no-sync, tail timings (stress.json)"
fi

# ---- benchmark -----------------------------------------------------------------------------
# bench NAME LIMIT_S ARGS...: one reduced run; its JSON is written atomically (a run stopped at
# its limit leaves the rows it finished). Running out of time is noted, not failed.
bench() {
  local name=$1 limit=$2
  shift 2
  run_step "$name" "$limit" "$LOGS/$name.log" "$PY" -m gradstats bench --device cuda \
    --scenario "${BENCH_SCENARIOS[@]}" --no-progress --json "$RESULTS/$name.json" "$@"
  local status
  status=$(status_of "$STEP_RC")
  if [[ $status == TIMEOUT ]]; then
    record "$name" NOTE "$STEP_S" "out of time: the rows finished are in $name.json"
  else
    record "$name" "$status" "$STEP_S" "$name.json"
  fi
}
RESERVE_S=0
if [[ $IMPORT_OK -ne 1 ]]; then
  record bench SKIPPED 0 "build or import failed"
else
  bench bench_bf16 "$BENCH_BF16_TIMEOUT_S" --preset gpt2-small many-tiny many-medium --dtype bfloat16
  bench bench_fp32 "$BENCH_FP32_TIMEOUT_S" --preset gpt2-small --dtype float32
fi

# ---- the table -----------------------------------------------------------------------------
TOTAL=$(($(date +%s) - START))
{
  echo
  echo "gradstats GPU check on ${GPU_NAME:-unknown GPU}: $( ((FAILED)) && echo FAILED || echo passed) in ${TOTAL}s; results in $RESULTS"
  printf '%-11s %-8s %6s  %s\n' step status time detail
  for i in "${!STEPS[@]}"; do
    printf '%-11s %-8s %5ss  %s\n' "${STEPS[$i]}" "${STATUS[$i]}" "${SECONDS_TAKEN[$i]}" "${DETAILS[$i]:0:100}"
  done
  # The benchmark's rows, one line each (the full numbers are in the JSON).
  for name in bench_bf16 bench_fp32; do
    [[ -s "$RESULTS/$name.json" ]] || continue
    "$PY" - "$RESULTS/$name.json" <<'PYEOF' 2>/dev/null
import json, sys
rows = json.load(open(sys.argv[1]))["rows"]
for r in rows:
    if "speedup" in r:
        print(f"  {r['preset']:<12} {r['dtype']:<9} {r['scenario']:<11} {r['speedup']:5.2f}x torch,"
              f" {r.get('floor_fraction') or 0:4.2f} of copy")
PYEOF
  done
} | tee "$RESULTS/summary.txt"
exit "$FAILED"
