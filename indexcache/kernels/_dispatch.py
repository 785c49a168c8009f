"""Choosing between the Triton kernel and the PyTorch reference."""
import os

import torch


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (tests on machines without a GPU)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(t: torch.Tensor) -> bool:
    """Run the Triton kernel for this tensor: on CUDA, or on CPU under the interpreter."""
    return t.is_cuda or interpreting()
