#!/usr/bin/env bash
# Everything a GPU session checks and times, in one device call (each stage time-boxed so the call ends in time):
#   GPU tests -> kernel benchmark (same-run ceilings) -> end-to-end benchmark. Logs and JSON land in $OUT.
# Usage (on the device machine, from the repo root): bash benchmarks/gpu_run.sh [TESTS_S KERNELS_S E2E_S] [e2e args]
set -u -o pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
T_TESTS=${1:-90}; T_KERNELS=${2:-200}; T_E2E=${3:-270}; shift $(( $# < 3 ? $# : 3 ))
E2E_ARGS=${*:-"--layers 4 --contexts 10K,60K,120K,200K"}
{ nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,power.limit,memory.used,memory.total --format=csv
  python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; } 2>&1 | tee "$OUT/env.txt"
echo "== GPU tests"; timeout "$T_TESTS" python -m pytest -q -m gpu tests 2>&1 | tail -40 | tee "$OUT/gpu_tests.log"
echo "== kernels"; timeout "$T_KERNELS" python -m benchmarks.kernels 2>&1 | tee "$OUT/kernels.log" | tail -60
echo "== e2e $E2E_ARGS"; timeout "$T_E2E" python -m benchmarks.e2e $E2E_ARGS 2>&1 | tee "$OUT/e2e.log" | tail -40
ls -la "$OUT"
