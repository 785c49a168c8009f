"""Grouped GEMM of expert-sorted fp8 rows against FP8 block-scaled expert weights: checks and dispatch (Triton on
CUDA or under TRITON_INTERPRET=1, the PyTorch reference otherwise)."""
from __future__ import annotations

import torch

from indexcache.kernels._dispatch import use_triton
from indexcache.kernels.fp8_grouped_mm.reference import check_grouped_inputs, fp8_grouped_mm_reference


def fp8_grouped_mm(a, counts, w, scale_inv, a_scale, out_dtype=torch.bfloat16, out=None):
    """a fp8 [M, K] sorted by expert with its 1x128 ``a_scale`` fp32 [M, ceil(K/128)] (``quantize_act``),
    counts [E], w fp8 [E, N, K], scale_inv [E, ceil(N/128), ceil(K/128)] -> [M, N] in ``out_dtype`` (see
    reference.py). ``out``: optional [M, N] destination (may be a column slice)."""
    check_grouped_inputs("fp8_grouped_mm", a, counts, w, scale_inv, a_scale, out_dtype)
    if use_triton(a):
        from indexcache.kernels.fp8_grouped_mm.triton import fp8_grouped_mm_triton

        return fp8_grouped_mm_triton(a, counts, w, scale_inv, a_scale, out=out, out_dtype=out_dtype)
    y = fp8_grouped_mm_reference(a, counts, w, scale_inv, a_scale, out_dtype)
    if out is None:
        return y
    out.copy_(y)
    return out
