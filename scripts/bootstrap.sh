#!/usr/bin/env bash
# One-time set-up on a fresh machine: a virtual environment in .venv with the CPU build of torch (pinned, so
# pip never pulls a multi-GB CUDA build), triton, and indexcache with its test extras. Idempotent: a ready .venv
# is checked (a few seconds: it imports the packages) and left alone, silently.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
say() { echo "bootstrap: $*" >&2; }
if [ ! -x .venv/bin/python ]; then
  say "creating .venv with $("$PY" --version 2>&1)"
  "$PY" -m venv .venv
fi
if ! .venv/bin/python -c "import torch, triton, numpy, safetensors, tokenizers, jinja2, pytest, transformers, fastapi, uvicorn, openai, indexcache" 2>/dev/null; then
  start=$SECONDS
  say "installing torch 2.13.0 into .venv (a minute or two on a fresh machine) ..."
  .venv/bin/pip install -q --disable-pip-version-check "torch==2.13.0"
  say "installing triton 3.7.1, indexcache and its test extras (transformers, pytest) ..."
  .venv/bin/pip install -q --disable-pip-version-check "triton==3.7.1" -e ".[test]"
  say "done in $((SECONDS - start)) s; later runs skip this"
fi
