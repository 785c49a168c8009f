"""Plain PyTorch FP8 block quantisation (DeepSeek format) and the block-scaled linear it feeds.

Weights: fp8 e4m3 ``w`` [N, K] with ``scale_inv`` fp32 [ceil(N/128), ceil(K/128)]; W = w * scale_inv[n//128, k//128].
Activations: per token and per 128-channel group (1x128): x ~= q * scale[m, k//128], q fp8 e4m3, scale fp32 =
amax(group) / 448. The scales are plain fp32, not rounded to powers of two: Hopper's block-scaled GEMM accepts fp32
scales, and an fp32 scale puts the group's amax exactly on e4m3's largest value (a power-of-two scale wastes up to
one bit of range; it only matters for UE8M0 scale formats, which this GPU path does not use).
Ragged shapes (N or K not a multiple of 128) use partial last blocks, as the checkpoints do.
"""
from __future__ import annotations

import torch

BLOCK = 128
FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
_TINY = 1e-12  # an all-zero group gets a tiny scale (its values quantise to 0), never a division by zero


def scale_from_amax(amax: torch.Tensor) -> torch.Tensor:
    """max(amax, tiny) / 448 as one correctly rounded division on every device. Divided by a Python number, torch
    multiplies by its reciprocal on CUDA (an ulp off), which moved values at e4m3 rounding ties to the other
    neighbour than the CPU and the Triton kernel (``div_rn``) chose."""
    return amax.clamp(min=_TINY) / torch.full((), FP8_MAX, device=amax.device)


def blocks(n: int) -> int:
    return -(-n // BLOCK)


def check_weight(name: str, w: torch.Tensor, scale_inv: torch.Tensor) -> None:
    if w.dim() != 2 or scale_inv.dim() != 2:
        raise ValueError(f"{name}: FP8 block weights need 2-D tensors, got {tuple(w.shape)} and "
                         f"{tuple(scale_inv.shape)}")
    want = (blocks(w.shape[0]), blocks(w.shape[1]))
    if tuple(scale_inv.shape) != want:
        raise ValueError(f"{name}: weight_scale_inv shape {tuple(scale_inv.shape)} does not fit a weight of shape "
                         f"{tuple(w.shape)} in {BLOCK}x{BLOCK} blocks (expected {want})")


def dequantize_weight(w: torch.Tensor, scale_inv: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """W = fp8 * scale_inv[i // 128, j // 128], in ``dtype`` (computed in fp32)."""
    check_weight("dequantize_weight", w, scale_inv)
    s = scale_inv.float().repeat_interleave(BLOCK, 0)[: w.shape[0]].repeat_interleave(BLOCK, 1)[:, : w.shape[1]]
    return (w.float() * s).to(dtype)


def quantize_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per 128x128 block amax / 448 -> (fp8 e4m3 weight [N, K], fp32 scale_inv [ceil(N/128), ceil(K/128)])."""
    if w.dim() != 2:
        raise ValueError(f"quantize_weight: a 2-D weight is needed, got shape {tuple(w.shape)}")
    n, k = w.shape
    rows, cols = blocks(n), blocks(k)
    padded = torch.zeros(rows * BLOCK, cols * BLOCK, dtype=torch.float32, device=w.device)
    padded[:n, :k] = w.float()
    b = padded.view(rows, BLOCK, cols, BLOCK)
    scale = scale_from_amax(b.abs().amax(dim=(1, 3)))
    q = (b / scale[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).view(rows * BLOCK, cols * BLOCK)[:n, :k]
    return q.to(FP8), scale


def quantize_act_reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (q fp8 [M, K], scale fp32 [M, ceil(K/128)]) with x ~= q * scale per 1x128 group."""
    if x.dim() != 2:
        raise ValueError(f"quantize_act: x must be [M, K], got shape {tuple(x.shape)}")
    m, k = x.shape
    kb = blocks(k)
    xf = torch.zeros(m, kb * BLOCK, dtype=torch.float32, device=x.device)
    xf[:, :k] = x.float()
    g = xf.view(m, kb, BLOCK)
    scale = scale_from_amax(g.abs().amax(-1))
    q = (g / scale[..., None]).clamp(-FP8_MAX, FP8_MAX).view(m, kb * BLOCK)[:, :k]
    return q.to(FP8), scale


def dequantize_act(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """fp32 x from (q [M, K], scale [M, ceil(K/128)])."""
    return q.float() * scale.float().repeat_interleave(BLOCK, 1)[:, : q.shape[1]]


def fp8_linear_reference(x: torch.Tensor, w: torch.Tensor, scale_inv: torch.Tensor,
                         out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """What the GPU computes: y = dequant(quant_1x128(x)) @ dequant(w)^T in fp32, returned in ``out_dtype``
    (default x.dtype). x [..., K] -> y [..., N]."""
    check_weight("fp8_linear_reference", w, scale_inv)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    xq = dequantize_act(*quantize_act_reference(x2))
    y = xq @ dequantize_weight(w, scale_inv).t()
    return y.to(out_dtype or x.dtype).view(*lead, w.shape[0])


def fp8_linear_weight_only_reference(x: torch.Tensor, w: torch.Tensor, scale_inv: torch.Tensor,
                                     out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """The small-M (W8A16) path: y = x @ dequant(w)^T in fp32, x NOT quantised, returned in ``out_dtype``
    (default x.dtype). x [..., K] -> y [..., N]."""
    check_weight("fp8_linear_weight_only_reference", w, scale_inv)
    lead = x.shape[:-1]
    y = x.reshape(-1, x.shape[-1]).float() @ dequantize_weight(w, scale_inv).t()
    return y.to(out_dtype or x.dtype).view(*lead, w.shape[0])
