"""RMSNorm in fp32, as the DSA reference implementations compute it: the normalised row is rounded to the input's
dtype before the weight multiplies it (so a bf16 model rounds twice, as transformers does)."""
from __future__ import annotations

import torch


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    """weight * (x * rsqrt(mean(x^2) + eps)) over the last dim; with ``residual``, x is ``x + residual`` first
    (rounded to x's dtype) and the result is (normed, x + residual)."""
    if residual is not None:
        x = x + residual
    dtype = x.dtype
    xf = x.float()
    y = weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(dtype)
    return y if residual is None else (y, x)
