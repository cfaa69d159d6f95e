#!/usr/bin/env bash
# The whole GPU check of gradstats, for a fresh machine with a GPU, torch, nvcc and no network:
#   build (pip install --no-build-isolation -e ., all cores, sm_90 only unless GRADSTATS_CUDA_ARCHS
#   says otherwise), the GPU tests (tests/test_cuda.py and the suite's cuda cases), compute-sanitizer
#   memcheck / racecheck / synccheck / initcheck on a small statistics-plus-clipping program (after
#   a negative control proving that the kernel filter instruments our kernels), a stress of two
#   streams and CUDA graph replays with the statistics kernel's tail timings
#   (benchmarks/gpu_stress.py), and the GPU benchmark. Full logs go to OUTDIR; a short table is
#   printed last. Every step has a timeout and the whole check stays within CHECK_BUDGET_S (under
#   8 minutes on an H200).
#
#   bash benchmarks/gpu_check.sh OUTDIR
#
# Exit status: 0 when every step that ran passed, 1 otherwise (a missing sanitizer is reported,
# not failed).
set -u -o pipefail

if [[ $# -ne 1 ]]; then
  echo "usage: $0 OUTDIR" >&2
  exit 2
fi
OUT=$(mkdir -p "$1" && cd "$1" && pwd)
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || exit 2
PY=${PYTHON:-python}

# Wall-clock budget of the whole check, seconds: under 8 minutes with room for the table.
CHECK_BUDGET_S=${CHECK_BUDGET_S:-460}
# Per-step limits, seconds; a step also never runs past the budget.
BUILD_TIMEOUT_S=300
TESTS_TIMEOUT_S=240
MEMCHECK_TIMEOUT_S=150
RACECHECK_TIMEOUT_S=120
SYNCCHECK_TIMEOUT_S=90
INITCHECK_TIMEOUT_S=90
CONTROL_TIMEOUT_S=60
STRESS_TIMEOUT_S=120
BENCH_TIMEOUT_S=150
# A step that would get less time than this is skipped rather than started.
MIN_STEP_S=20
# compute-sanitizer exits with this when it found errors (any value the program cannot return).
SANITIZER_ERROR_EXIT=86
# The sanitizers instrument only kernels whose name holds this (csrc/cuda/kernels.cuh).
KERNEL_FILTER="kns=gradstats_"

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

# run_step NAME LIMIT_S LOG CMD...: runs CMD under a timeout (the smaller of LIMIT_S and what is
# left of the budget), its output in LOG; sets STEP_RC and STEP_S.
run_step() {
  local name=$1 limit=$2 log=$3
  shift 3
  local left
  left=$(($(remaining) - 5))
  ((left < limit)) && limit=$left
  if ((limit < MIN_STEP_S)); then
    STEP_RC=-1
    STEP_S=0
    echo "skipped: out of time budget" >"$log"
    return
  fi
  echo "== $name (limit ${limit}s): $*" | tee -a "$OUT/check.log"
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

: >"$OUT/check.log"

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
} >"$OUT/env.txt"
GPU_NAME=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)

# ---- build ---------------------------------------------------------------------------------
# nvcc compiles the three targets of kernels.cu (sm_80, sm_90, compute_90) in parallel.
export NVCC_APPEND_FLAGS="${NVCC_APPEND_FLAGS:-} --threads 0"
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
export GRADSTATS_CUDA=1 GRADSTATS_PTXAS_VERBOSE=1
export GRADSTATS_CUDA_ARCHS=${GRADSTATS_CUDA_ARCHS:-9.0}
run_step build "$BUILD_TIMEOUT_S" "$OUT/build.log" \
  "$PY" -m pip install -v --no-build-isolation --no-deps -e .
BUILD_RC=$STEP_RC
BUILD_S=$STEP_S
if [[ $BUILD_RC -ne 0 && $BUILD_RC -ne -1 && $BUILD_RC -ne 124 && $BUILD_RC -ne 137 ]]; then
  # pip itself may be what fails offline; the extension builds the same way in place.
  run_step build-inplace "$BUILD_TIMEOUT_S" "$OUT/build_inplace.log" \
    "$PY" setup.py build_ext --inplace
  BUILD_RC=$STEP_RC
  BUILD_S=$((BUILD_S + STEP_S))
fi
# Register and spill counts of every kernel (-Xptxas -v), for the closing note.
cat "$OUT"/build*.log 2>/dev/null | grep -E "Compiling entry function|Used [0-9]+ registers|spill" \
  | sed -E 's/.*Compiling entry function .(_Z[^ ]*). for .(sm_[0-9]+)./\2 \1/; s/^ *ptxas info *: *//' \
  >"$OUT/ptxas.txt" || true
KERNELS=$(grep -c "Used" "$OUT/ptxas.txt" 2>/dev/null)
SPILLS=$(grep -E "spill" "$OUT/ptxas.txt" | grep -vc " 0 bytes spill stores, 0 bytes spill loads" || true)
MAXREG=$(grep -oE "Used [0-9]+ registers" "$OUT/ptxas.txt" | awk '{print $2}' | sort -n | tail -1)
# Stack frames: a table passed by value and indexed dynamically could be copied to the stack.
STACKS=$(grep -oE "[0-9]+ bytes stack frame" "$OUT/ptxas.txt" | grep -vc "^0 bytes" || true)
record build "$(status_of "$BUILD_RC")" "$BUILD_S" \
  "${KERNELS:-0} kernel builds, max ${MAXREG:-?} registers, ${SPILLS:-0} with spills, ${STACKS:-0} with stack frames (ptxas.txt)"

# This checkout first, whether pip's editable install or the in-place build made it.
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
IMPORT_OK=0
if [[ $BUILD_RC -eq 0 ]]; then
  "$PY" -c "import gradstats as g, sys; print(g.__file__, g.BUILD_INFO, g.kernel_devices()); \
sys.exit(0 if all('CUDA' in k for k in g.kernel_devices().values()) else 1)" \
    >"$OUT/import.log" 2>&1 && IMPORT_OK=1
  [[ $IMPORT_OK -eq 1 ]] || record import FAIL 0 "no CUDA kernels registered (import.log)"
fi

# ---- GPU tests -----------------------------------------------------------------------------
pytest_detail() {  # the pytest summary line of a log
  grep -E "[0-9]+ (passed|failed|errors?|skipped)" "$1" | tail -1 | sed -E 's/=+//g; s/^ +| +$//g'
}
if [[ $IMPORT_OK -eq 1 ]]; then
  run_step gpu-tests "$TESTS_TIMEOUT_S" "$OUT/pytest_gpu.log" \
    "$PY" -m pytest -m gpu -q -rfEs --durations=15 --junitxml="$OUT/pytest_gpu.xml" tests
  record "gpu tests" "$(status_of "$STEP_RC")" "$STEP_S" "$(pytest_detail "$OUT/pytest_gpu.log")"
else
  record "gpu tests" SKIPPED 0 "build or import failed"
fi

# ---- compute-sanitizer ---------------------------------------------------------------------
SANITIZER=$(command -v compute-sanitizer || true)
for candidate in "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer" \
  "${CUDA_HOME:-/usr/local/cuda}/compute-sanitizer/compute-sanitizer"; do
  [[ -z "$SANITIZER" && -x "$candidate" ]] && SANITIZER=$candidate
done

sanitize() {  # tool limit env-assignment extra-args...
  local tool=$1 limit=$2 env_assignment=$3
  shift 3
  local log="$OUT/sanitizer_$tool.log"
  local common=(--tool "$tool" --error-exitcode "$SANITIZER_ERROR_EXIT" --report-api-errors no "$@")
  # Only the gradstats kernels are instrumented (torch's own are not ours to check, and slow).
  # Their names carry "gradstats_" in both mangled and demangled form; the control step below
  # proves that the filter instruments them.
  run_step "$tool" "$limit" "$log" env "$env_assignment" "$SANITIZER" "${common[@]}" \
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
  CONTROL_LOG="$OUT/sanitizer_control.log"
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
  sanitize memcheck "$MEMCHECK_TIMEOUT_S" PYTORCH_NO_CUDA_MEMORY_CACHING=1 --leak-check no
  sanitize racecheck "$RACECHECK_TIMEOUT_S" GRADSTATS_SANITIZER=racecheck --racecheck-report hazard
  sanitize synccheck "$SYNCCHECK_TIMEOUT_S" GRADSTATS_SANITIZER=synccheck
  sanitize initcheck "$INITCHECK_TIMEOUT_S" PYTORCH_NO_CUDA_MEMORY_CACHING=1
fi

# ---- stress and tail timings ---------------------------------------------------------------
if [[ $IMPORT_OK -ne 1 ]]; then
  record stress SKIPPED 0 "build or import failed"
else
  run_step stress "$STRESS_TIMEOUT_S" "$OUT/stress.log" \
    "$PY" benchmarks/gpu_stress.py --json "$OUT/stress.json"
  record stress "$(status_of "$STEP_RC")" "$STEP_S" "two streams, graph replays, no-sync, tail timings (stress.json)"
fi

# ---- benchmark -----------------------------------------------------------------------------
if [[ $IMPORT_OK -ne 1 ]]; then
  record bench SKIPPED 0 "build or import failed"
else
  run_step bench "$BENCH_TIMEOUT_S" "$OUT/bench_gpu.log" \
    "$PY" -m gradstats bench --device cuda --json "$OUT/bench_gpu.json"
  record bench "$(status_of "$STEP_RC")" "$STEP_S" "bench_gpu.json, bench_gpu.log"
fi

# ---- the table -----------------------------------------------------------------------------
TOTAL=$(($(date +%s) - START))
{
  echo
  echo "gradstats GPU check on ${GPU_NAME:-unknown GPU}: $( ((FAILED)) && echo FAILED || echo passed) in ${TOTAL}s; logs in $OUT"
  printf '%-11s %-8s %6s  %s\n' step status time detail
  for i in "${!STEPS[@]}"; do
    printf '%-11s %-8s %5ss  %s\n' "${STEPS[$i]}" "${STATUS[$i]}" "${SECONDS_TAKEN[$i]}" "${DETAILS[$i]}"
  done
} | tee "$OUT/summary.txt"
exit "$FAILED"
