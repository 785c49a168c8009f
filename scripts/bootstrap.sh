#!/usr/bin/env bash
# One-time set-up on a fresh machine: a virtual environment in .venv with the CPU build of torch (pinned, so
# pip never pulls a multi-GB CUDA build), triton, and indexcache with its test extras. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
if ! .venv/bin/python -c "import torch, triton, numpy, safetensors, tokenizers, jinja2, pytest, transformers, fastapi, uvicorn, openai, indexcache" 2>/dev/null; then
  .venv/bin/pip install -q --disable-pip-version-check "torch==2.13.0"
  .venv/bin/pip install -q --disable-pip-version-check "triton==3.7.1" -e ".[test]"
fi
