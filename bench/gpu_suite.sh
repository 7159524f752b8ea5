#!/usr/bin/env bash
# The GPU check, for a fresh H100/H200 machine (its own torch, nvcc, pytest and
# compute-sanitizer; no network): build, CUDA tests, the GPU benchmark, then the sanitizers
# (memcheck, initcheck, synccheck; our kernels use no shared memory, so racecheck has
# nothing to see). Each step has its own time limit and writes its whole log to OUTDIR as
# it runs, so a step that times out still leaves what it did; worst case about 8.5 minutes.
#   bench/gpu_suite.sh OUTDIR              on the GPU machine
#   bench/gpu_suite.sh --dry-run OUTDIR    anywhere (CI): the same steps with the GPU-only
#                                          parts replaced by imports, test collection and
#                                          CPU runs of the drivers; exit 0 only if all work
# OUTDIR gets suite.log (the summary), one <step>.log per step, and the benchmark's
# gpu-cuda.{csv,json,md,png}. Exit status: 0 if every step passed.
set -uo pipefail
DRY=0
if [ "${1:-}" = "--dry-run" ]; then DRY=1; shift; fi
OUT=${1:?usage: bench/gpu_suite.sh [--dry-run] OUTDIR}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16} PYTHONUNBUFFERED=1
CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
SANITIZER="$CUDA_HOME/bin/compute-sanitizer"
[ -x "$SANITIZER" ] || SANITIZER=$(command -v compute-sanitizer || echo "$SANITIZER")
SUMMARY="$OUT/suite.log"
: > "$SUMMARY"
status=0

say() { echo "$*" | tee -a "$SUMMARY"; }
# run NAME LIMIT_S CMD...: runs CMD with its whole output in OUT/NAME.log, then records
# PASS / FAIL (exit code) / TIMEOUT in the summary with the log's last lines.
run() {
  local name=$1 limit=$2; shift 2
  say "=== $name (limit ${limit}s, $(date -u +%H:%M:%S))"
  timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  if [ $rc -eq 0 ]; then say "--- $name: PASS"
  elif [ $rc -eq 124 ] || [ $rc -eq 137 ]; then say "--- $name: TIMEOUT after ${limit}s"; status=1
  else say "--- $name: FAIL (exit $rc)"; status=1
  fi
  tail -n 15 "$OUT/$name.log" | sed 's/^/    /' >> "$SUMMARY"
  return $rc
}

# compute-sanitizer refuses the device on some machines: that is neither clean nor a finding.
sanitize() {
  local tool=$1; shift
  local name="sanitizer-$tool"
  run "$name" 35 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SANITIZER" --tool "$tool" \
    --error-exitcode 9 "$PY" -m bench.sanitize_kernels
  if grep -qiE "device not supported|not supported on this|unable to (find|access)" "$OUT/$name.log"; then
    say "--- $name: REFUSED by compute-sanitizer on this machine (not a result)"
  fi
}

say "gpu_suite $([ $DRY = 1 ] && echo '(dry run) ')$(date -u '+%Y-%m-%d %H:%M UTC') in $(pwd)"
run environment 60 bash -c "nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 | head -3; \
  \"$PY\" -c \"import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'gpu', torch.cuda.is_available() and torch.cuda.get_device_name())\""

if [ $DRY = 0 ]; then
  run build 120 "$PY" setup.py -q build_ext --inplace --build-temp build/gpu || { say "build failed: stop"; exit 1; }
fi
# Fail fast: without the CUDA backend nothing below measures anything.
run backends 60 "$PY" -c "import embedding_ext as ee; info = ee.build_info(); print(info); \
assert 'cuda' in info['backends'], 'the extension was built without its CUDA kernels'" \
  || { say "no CUDA backend: stop"; exit 1; }

if [ $DRY = 0 ]; then
  # The CPU half runs in CI; here only what needs the GPU.
  run tests-cuda 120 "$PY" -m pytest -q -p no:cacheprovider -m cuda --maxfail=30 --durations=10 tests
  run benchmark 180 "$PY" -m bench.run --preset gpu --device cuda --out "$OUT"
  for tool in memcheck initcheck synccheck; do sanitize "$tool"; done
else
  run tests-cuda-collect 120 "$PY" -m pytest -q -p no:cacheprovider -m cuda --collect-only tests
  run benchmark-cpu-tiny 120 "$PY" -m bench.run --preset gpu --device cpu --filter tiny \
    --min-run-time 0.05 --rounds 1 --threads 1 --out "$OUT/dry-bench"
  run sanitize-driver-cpu 120 "$PY" -m bench.sanitize_kernels cpu
  run sanitizer-args 30 bash -c "test -x '$SANITIZER' && '$SANITIZER' --version | head -2 || echo 'compute-sanitizer not here ($SANITIZER): checked on the GPU machine only'"
fi
say "=== done, status $status ($(date -u +%H:%M:%S))"
exit $status
