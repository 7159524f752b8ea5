#!/usr/bin/env bash
# The GPU check, for a fresh H100/H200 machine (its own torch, nvcc, pytest and
# compute-sanitizer; no network): build, a probe of the bad-index round trip (rerun under
# cuda-gdb for a backtrace if it crashes), CUDA tests (in crash-tolerant pytest-xdist workers
# where the machine has xdist), the GPU benchmark, the fused step, the many-table collection,
# the quantized tables' rows (bench/quantized.py), a torch.profiler pass over
# the rows that lose (bench/gpu_profile.py), then the sanitizers memcheck and initcheck
# on the driver's quick case list (our kernels use no shared memory and no barriers, so
# racecheck and synccheck have nothing to see). Each step has a time limit, and all of them
# share one deadline (BUDGET_S, default 540 s), so the script ends on time and says what it
# skipped.
#   bench/gpu_suite.sh OUTDIR              on the GPU machine
#   bench/gpu_suite.sh --dry-run OUTDIR    anywhere (CI): the same steps with the GPU-only
#                                          parts replaced by imports, test collection and
#                                          CPU runs of the drivers; exit 0 only if all work
# OUTDIR gets at most 7 files (the device tool returns 8): suite.log (the summary, written
# as the steps run), steps.log (every step's whole output, appended after each step), the
# benchmark's gpu-cuda.{csv,json,md,png} and fused-step-cuda.md (the fused optimizer step,
# with its measured peak memory). Exit status 0 if every step passed; a
# sanitizer that refuses the device is reported as REFUSED and does not count as a failure.
set -uo pipefail
DRY=0
OUT=
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY=1 ;;
    -*) echo "gpu_suite.sh: unknown option $arg" >&2; exit 2 ;;
    *) [ -z "$OUT" ] || { echo "gpu_suite.sh: one OUTDIR only" >&2; exit 2; }; OUT=$arg ;;
  esac
done
[ -n "$OUT" ] || { echo "usage: bench/gpu_suite.sh [--dry-run] OUTDIR" >&2; exit 2; }
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd) || exit 2
cd "$(dirname "$0")/.." || exit 2
PY=${PYTHON:-python3}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16} PYTHONUNBUFFERED=1
CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
SANITIZER="$CUDA_HOME/bin/compute-sanitizer"
[ -x "$SANITIZER" ] || SANITIZER=$(command -v compute-sanitizer || echo "$SANITIZER")
DEADLINE=$((SECONDS + ${BUDGET_S:-540}))
SCRATCH=$(mktemp -d)
SUMMARY="$OUT/suite.log"
: > "$SUMMARY"
: > "$OUT/steps.log"
status=0

say() { echo "$*" | tee -a "$SUMMARY"; }
# run NAME LIMIT_S CMD...: CMD's whole output goes to steps.log; the summary records PASS,
# FAIL (exit code), TIMEOUT or SKIPPED (no time left before the deadline) and the last lines.
run() {
  local name=$1 limit=$2; shift 2
  local left=$((DEADLINE - SECONDS - 10))
  if [ "$left" -lt 15 ]; then say "--- $name: SKIPPED (the ${BUDGET_S:-540} s budget is spent)"; status=1; return 1; fi
  [ "$limit" -le "$left" ] || limit=$left
  say "=== $name (limit ${limit}s, $(date -u +%H:%M:%S))"
  local start=$SECONDS
  timeout --kill-after=5 "$limit" "$@" > "$SCRATCH/$name.log" 2>&1
  local rc=$? took=$((SECONDS - start))
  { echo "===== $name (exit $rc, ${took}s)"; cat "$SCRATCH/$name.log"; } >> "$OUT/steps.log"
  if [ $rc -eq 0 ]; then say "--- $name: PASS (${took}s)"
  elif [ $rc -eq 124 ] || { [ $rc -eq 137 ] && [ $took -ge "$limit" ]; }; then
    say "--- $name: TIMEOUT after ${limit}s"; status=1
  else say "--- $name: FAIL (exit $rc, ${took}s)"; status=1
  fi
  tail -n "${TAIL_LINES:-12}" "$SCRATCH/$name.log" | sed 's/^/    /' >> "$SUMMARY"
  return $rc
}

refused=0
# compute-sanitizer refuses the device on some machines: that is neither clean nor a finding.
sanitize() {
  local tool=$1 before=$status
  if [ $refused = 1 ]; then say "--- sanitizer-$tool: not run (the device was refused)"; return; fi
  run "sanitizer-$tool" "$2" env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SANITIZER" --tool "$tool" \
    --error-exitcode 9 "$PY" -m bench.sanitize_kernels --quick
  if grep -qiE "device not supported|not supported on this|unable to (find|access) (a |the )?device" \
      "$SCRATCH/sanitizer-$tool.log"; then
    say "--- sanitizer-$tool: REFUSED by compute-sanitizer on this machine (not a result)"
    refused=1
    status=$before
  fi
}

say "gpu_suite $([ $DRY = 1 ] && echo '(dry run) ')$(date -u '+%Y-%m-%d %H:%M UTC') in $(pwd)"
run environment 30 bash -c 'nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 | head -3
"$1" -c "import torch; print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"gpu\", torch.cuda.is_available() and torch.cuda.get_device_name())"' _ "$PY"

if [ $DRY = 0 ]; then
  run build 180 "$PY" setup.py -q build_ext --force --inplace --build-temp build/gpu \
    || { say "build failed: stop"; exit 1; }
fi
# Fail fast: without the CUDA backend nothing below measures anything.
run backends 30 "$PY" -c "import embedding_ext as ee; info = ee.build_info(); print(info); \
assert 'cuda' in info['backends'], 'the extension was built without its CUDA kernels'" \
  || { say "no CUDA backend: stop"; exit 1; }

if [ $DRY = 0 ]; then
  # The bad-index round trip alone first: if it crashes, a backtrace from cuda-gdb.
  if ! run probe 60 "$PY" -m bench.gpu_probe && command -v cuda-gdb > /dev/null; then
    TAIL_LINES=40 run probe-backtrace 90 cuda-gdb -q -batch -ex run -ex bt -ex "info registers rip" \
      --args "$PY" -m bench.gpu_probe
  fi
  run selfcheck 60 "$PY" -m embedding_ext
  # The CPU half runs in CI; here only what needs the GPU (200 s: the collection, CUDA graph
  # and quantized tests joined the 150 s set). With xdist, a crashing test takes
  # down one worker (reported, then replaced), not the run.
  xdist=()
  "$PY" -c "import xdist" 2> /dev/null && xdist=(-n 4)
  TAIL_LINES=40 run tests-cuda 200 "$PY" -m pytest -q -p no:cacheprovider -m cuda "${xdist[@]}" \
    -rfE --tb=short --durations=10 tests
  # 0.05 s per measurement: run 3 (0.1 s) needed all of the 150 s for its 93 rows and lost
  # the plot.
  run benchmark 150 "$PY" -m bench.run --preset gpu --device cuda --min-run-time 0.05 --out "$OUT"
  run fused-step 60 "$PY" -m bench.fused_step --device cuda --rounds 3 --out "$OUT"
  # The many-table collection against per-table loops (tables into steps.log).
  run collection 45 "$PY" -m bench.collection --device cuda --rounds 20 --cases criteo,wide
  # Quantized tables: the quant preset's rows on this GPU (the table goes to steps.log and the
  # summary; its files stay in the scratch folder). Their CUDA tests ran with the others.
  TAIL_LINES=16 run benchmark-quantized 90 "$PY" -m bench.quantized --device cuda --rounds 3 \
    --out "$SCRATCH/quant"
  # Where the time goes in the rows that lose (tables into steps.log: no more OUTDIR files).
  run profile 60 "$PY" -m bench.gpu_profile --device cuda
  sanitize memcheck 90
  sanitize initcheck 60
else
  run tests-cuda-collect 120 "$PY" -m pytest -q -p no:cacheprovider -m cuda --collect-only tests
  run benchmark-cpu-tiny 120 "$PY" -m bench.run --preset gpu --device cpu --filter tiny \
    --min-run-time 0.05 --rounds 1 --threads 1 --out "$SCRATCH/dry-bench"
  run benchmark-cpu-bags 120 "$PY" -m bench.run --preset bag --device cpu --filter rec-bags-small \
    --min-run-time 0.01 --rounds 1 --threads 1 --out "$SCRATCH/dry-bench"
  run fused-step-cpu 120 "$PY" -m bench.fused_step --device cpu --rounds 1 --filter 50000x768
  run collection-cpu 60 "$PY" -m bench.collection --device cpu --rounds 1 --cases dlrm --cap 2000
  run benchmark-quantized-cpu 60 "$PY" -m bench.quantized --device cpu --rounds 1 \
    --num-rows 20000 --out "$SCRATCH/dry-bench"
  run profile-cpu 60 "$PY" -m bench.gpu_profile --device cpu --iters 3
  run selfcheck-cpu 60 "$PY" -m embedding_ext
  run sanitize-driver-cpu 120 "$PY" -m bench.sanitize_kernels cpu --quick
  run sanitizer-found 30 bash -c 'if [ -x "$1" ]; then "$1" --version | head -2; else echo "compute-sanitizer not here ($1): checked on the GPU machine only"; fi' _ "$SANITIZER"
fi
rm -rf "$SCRATCH"
say "=== done, status $status ($(date -u +%H:%M:%S), ${SECONDS}s)"
exit $status
