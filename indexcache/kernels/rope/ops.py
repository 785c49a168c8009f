"""Rotary embedding of x [T, H, R] by per-token cos/sin [T, R/2], written into ``out`` (a slice of a wider
buffer, e.g. the rope part of the absorbed query, or x itself), so no rotated copy is concatenated afterwards.

The Triton kernel runs on CUDA tensors (or under TRITON_INTERPRET=1); the PyTorch reference otherwise. The kernel
rounds as the reference's separate ops do, so the results are equal.
"""
from __future__ import annotations

import torch

from indexcache.kernels._dispatch import use_triton
from indexcache.kernels.rope.reference import rope_reference


def _check(x, cos, sin, out):
    if x.dim() != 3 or x.shape[2] % 2 or not x.dtype.is_floating_point or x.stride(2) != 1:
        raise ValueError(f"rope: x must be [T, H, R] float with R even and unit stride on R, got "
                         f"{tuple(x.shape)} {x.dtype} strides {x.stride()}")
    T, _, R = x.shape
    for name, t in (("cos", cos), ("sin", sin)):
        if t.shape != (T, R // 2) or t.stride(1) != 1:
            raise ValueError(f"rope: {name} must be [{T}, {R // 2}] with unit column stride, got {tuple(t.shape)}")
    dtype = torch.promote_types(torch.promote_types(x.dtype, cos.dtype), sin.dtype)
    if out is not None and (out.shape != x.shape or out.dtype != dtype or out.stride(2) != 1):
        raise ValueError(f"rope: out must be {tuple(x.shape)} {dtype} with unit stride on R, got {tuple(out.shape)} "
                         f"{out.dtype} strides {out.stride()}")
    return dtype


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool, *,
         out: torch.Tensor | None = None) -> torch.Tensor:
    """x [T, H, R] rotated by cos/sin [T, R/2] (``interleaved``: pairs (2i, 2i+1), output de-interleaved; else
    pairs (i, i + R/2)) -> ``out`` (new when None; may be x itself, or overlap nothing else of x)."""
    dtype = _check(x, cos, sin, out)
    if not use_triton(x):
        y = rope_reference(x, cos[:, None], sin[:, None], interleaved)
        return y if out is None else out.copy_(y)
    from indexcache.kernels.rope.triton import rope_triton

    if out is None:
        out = torch.empty(x.shape, dtype=dtype, device=x.device)
    rope_triton(x, cos, sin, interleaved, out)
    return out
