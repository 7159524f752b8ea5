#!/usr/bin/env bash
# The GPU check, for a fresh H100/H200 machine that has torch, nvcc, pytest and
# compute-sanitizer: build from source, run the whole test suite (CUDA tests included),
# run every kernel under memcheck and racecheck, then the full GPU benchmark preset.
# Writes suite.log plus gpu-cuda.{csv,json,md,png} to OUTDIR. Aim: under 8 minutes.
#   bench/gpu_suite.sh OUTDIR
set -uo pipefail
OUT=${1:?usage: bench/gpu_suite.sh OUTDIR}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
LOG="$OUT/suite.log"
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16} PYTHONUNBUFFERED=1
status=0
step() { echo; echo "=== $1 ($(date -u +%H:%M:%S))"; }
exec > >(tee "$LOG") 2>&1
step "environment"
date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
step "build"
"$PY" setup.py -q build_ext --inplace --build-temp build/gpu > "$OUT/build.tmp" 2>&1 || { tail -60 "$OUT/build.tmp"; exit 1; }
grep -E "warning" "$OUT/build.tmp" | grep -v site-packages | head -20; rm -f "$OUT/build.tmp"
"$PY" -c "import embedding_ext as ee; print(ee.build_info())"
step "tests"
"$PY" -m pytest -q -p no:cacheprovider tests > "$OUT/tests.tmp" 2>&1 || status=1
tail -40 "$OUT/tests.tmp"; rm -f "$OUT/tests.tmp"
for tool in memcheck racecheck; do
  step "compute-sanitizer $tool"
  compute-sanitizer --tool "$tool" --error-exitcode 9 "$PY" -m bench.sanitize_kernels > "$OUT/san.tmp" 2>&1 || status=1
  tail -15 "$OUT/san.tmp"; rm -f "$OUT/san.tmp"
done
step "benchmark (gpu preset)"
"$PY" -m bench.run --preset gpu --device cuda --out "$OUT" 2> "$OUT/bench.stderr" || { status=1; tail -20 "$OUT/bench.stderr"; }
step "done, status $status"
exit $status
