#!/usr/bin/env bash
# Everything a GPU session checks and times, in one device call; each stage is time-boxed so the call ends in time.
# Logs and JSON land in $OUT. Usage, from the repo root on the GPU machine:
#   STAGES="tests kernels e2e" bash benchmarks/gpu_run.sh [e2e args]
# Stages: tests (pytest -m gpu), kernels (every kernel case + same-run ceilings), topk (top-k cases only),
#         indexer_full (whole 200K-token indexer prefill: time and peak memory vs the workspace),
#         moe (the MoE layer and projections, bf16 vs FP8, stage by stage), decode_kernels (decode-sized kernels
#         from CUDA graphs), prefill_profile (per-kernel time of the last 16K chunk of a 200K prompt, whole FP8
#         model, keep 1/4), e2e.
# Time boxes (seconds): T_TESTS T_KERNELS T_TOPK T_INDEXER T_MOE T_DECODE T_PROFILE T_E2E.
set -u -o pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
STAGES=${STAGES:-"tests kernels e2e"}
E2E_ARGS=${*:-"--layers 4 --contexts 10K,60K,120K,200K"}
has() { [[ " $STAGES " == *" $1 "* ]]; }
{ nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,power.limit,memory.used,memory.total --format=csv
  python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; } 2>&1 | tee "$OUT/env.txt"
if has tests; then echo "== GPU tests"
  timeout "${T_TESTS:-90}" python -m pytest -q -m gpu tests 2>&1 | tail -40 | tee "$OUT/gpu_tests.log"; fi
if has kernels; then echo "== kernels"
  timeout "${T_KERNELS:-260}" python -m benchmarks.kernels 2>&1 | tee "$OUT/kernels.log" | tail -60; fi
if has topk; then echo "== top-k"
  BENCH_ONLY=topk timeout "${T_TOPK:-100}" python -m benchmarks.kernels --skip-indexer 2>&1 | tee "$OUT/topk.log" | tail -30; fi
if has indexer_full; then echo "== indexer full prefill"
  timeout "${T_INDEXER:-90}" python -m benchmarks.indexer_full_prefill 2>&1 | tee "$OUT/indexer_full.log" | tail -12; fi
if has moe; then echo "== moe prefill"
  timeout "${T_MOE:-120}" python -m benchmarks.moe_prefill 2>&1 | tee "$OUT/moe_prefill.log" | tail -30; fi
if has decode_kernels; then echo "== decode kernels"
  timeout "${T_DECODE:-120}" python -m benchmarks.decode_kernels 2>&1 | tee "$OUT/decode_kernels.log" | tail -30; fi
if has prefill_profile; then echo "== prefill profile"
  timeout "${T_PROFILE:-150}" python -m benchmarks.prefill_profile --model glm-4.7-flash-dsa --layers 0 \
    --weight-dtype fp8 --context 200K --patterns 1/4 2>&1 | tee "$OUT/prefill_profile.log" | tail -45; fi
if has e2e; then echo "== e2e $E2E_ARGS"
  timeout "${T_E2E:-220}" python -m benchmarks.e2e $E2E_ARGS 2>&1 | tee "$OUT/e2e.log" | tail -40; fi
ls -la "$OUT"
