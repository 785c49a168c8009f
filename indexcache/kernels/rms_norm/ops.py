"""RMSNorm with an optional residual add before it, in one pass over the rows.

The Triton kernel runs on CUDA tensors (or under TRITON_INTERPRET=1); the PyTorch reference otherwise. The maths is
the reference's (fp32 statistics, the normalised row rounded to x's dtype, then times the weight); only the order of
the fp32 sum of squares differs, so results agree with the reference to one rounding of the output dtype.
"""
from __future__ import annotations

import torch

from indexcache.kernels._dispatch import use_triton
from indexcache.kernels.rms_norm.reference import rms_norm_reference

MAX_WIDTH = 16384  # the kernel holds a row whole in one program; wider rows take the reference


def _check(x, weight, residual, out, residual_out):
    if x.dim() != 2 or not x.dtype.is_floating_point:
        raise ValueError(f"rms_norm: x must be [T, D] float, got {tuple(x.shape)} {x.dtype}")
    D = x.shape[1]
    if weight.shape != (D,):
        raise ValueError(f"rms_norm: weight must be [{D}], got {tuple(weight.shape)}")
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype):
        raise ValueError(f"rms_norm: residual must be {tuple(x.shape)} {x.dtype}, got {tuple(residual.shape)} "
                         f"{residual.dtype}")
    dtype = torch.promote_types(weight.dtype, x.dtype)
    for name, t, dt in (("out", out, dtype), ("residual_out", residual_out, x.dtype)):
        if t is not None and (t.shape != x.shape or t.dtype != dt or (D and t.stride(1) != 1)):
            raise ValueError(f"rms_norm: {name} must be {tuple(x.shape)} {dt} with unit column stride, got "
                             f"{tuple(t.shape)} {t.dtype} strides {t.stride()}")
    if residual_out is not None and residual is None:
        raise ValueError("rms_norm: residual_out needs a residual")
    return dtype


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, *, residual: torch.Tensor | None = None,
             out: torch.Tensor | None = None, residual_out: torch.Tensor | None = None):
    """``weight * rmsnorm(x)`` for rows x [T, D] (any row stride): [T, D] in weight's and x's promoted dtype.

    With ``residual`` [T, D]: the row is ``x + residual`` (rounded to x's dtype) and the result is (normed,
    x + residual), both from one read of each input. ``out`` / ``residual_out``: where to write them (unit column
    stride, any row stride: e.g. a slice of a wider buffer)."""
    dtype = _check(x, weight, residual, out, residual_out)
    if not use_triton(x) or x.shape[1] > MAX_WIDTH:
        ref = rms_norm_reference(x, weight, eps, residual)
        y, s = ref if residual is not None else (ref, None)
        if out is not None:
            y = out.copy_(y)
        if residual_out is not None:
            s = residual_out.copy_(s)
        return y if residual is None else (y, s)
    from indexcache.kernels.rms_norm.triton import rms_norm_triton

    x = x if x.stride(1) == 1 else x.contiguous()
    weight = weight if weight.stride(0) == 1 else weight.contiguous()
    if residual is not None and residual.stride(1) != 1:
        residual = residual.contiguous()
    y = out if out is not None else torch.empty(x.shape, dtype=dtype, device=x.device)
    s = None
    if residual is not None:
        s = residual_out if residual_out is not None else torch.empty_like(x, memory_format=torch.contiguous_format)
    rms_norm_triton(x, weight, eps, residual, y, s)
    return y if residual is None else (y, s)
