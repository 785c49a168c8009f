"""Grouped GEMM of expert-sorted rows against FP8 block-scaled expert weights: checks and dispatch (Triton on CUDA
or under TRITON_INTERPRET=1, the PyTorch reference otherwise)."""
from __future__ import annotations

from indexcache.kernels._dispatch import use_triton
from indexcache.kernels.fp8_grouped_mm.reference import check_grouped_inputs, fp8_grouped_mm_reference


def fp8_grouped_mm(a, counts, w, scale_inv, out=None, a_scale=None, out_dtype=None):
    """a [M, K] sorted by expert, counts [E], w fp8 [E, N, K], scale_inv [E, ceil(N/128), ceil(K/128)] ->
    [M, N] in a.dtype or ``out_dtype`` (see reference.py). ``a`` may be fp8 with its 1x128 ``a_scale`` [M,
    ceil(K/128)] (then ``out_dtype`` is required). ``out``: optional [M, N] destination (may be a column slice)."""
    check_grouped_inputs("fp8_grouped_mm", a, counts, w, scale_inv, a_scale, out_dtype)
    if use_triton(a):
        from indexcache.kernels.fp8_grouped_mm.triton import fp8_grouped_mm_triton

        return fp8_grouped_mm_triton(a, counts, w, scale_inv, a_scale=a_scale, out=out, out_dtype=out_dtype)
    y = fp8_grouped_mm_reference(a, counts, w, scale_inv, a_scale, out_dtype)
    if out is None:
        return y
    out.copy_(y)
    return out
