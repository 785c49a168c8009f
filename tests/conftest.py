"""Shared test set-up.

Triton reads TRITON_INTERPRET when a kernel is decorated, so it is set here, before any indexcache import,
whenever no CUDA device exists: kernels then run in the interpreter on CPU tensors.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from tests import interpreter_fastpaths  # noqa: E402

if os.environ.get("TRITON_INTERPRET") == "1":
    interpreter_fastpaths.install()  # CPU emulation shortcuts (same results): see interpreter_fastpaths.py


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def device():
    return "cuda" if torch.cuda.is_available() else "cpu"

