"""Plain PyTorch sparse MLA (absorbed / MQA mode), the oracle for the Triton kernels. The FP8 latent cache
(656 B per token) is the FlashMLA format of ``indexcache.kernels.formats``.
"""
from __future__ import annotations

import torch

from indexcache.kernels.formats import LATENT_DIM, LATENT_FP8_BYTES, NOPE, dequant_latent_fp8, quantize_latent_fp8


def sparse_mla_prefill_reference(q: torch.Tensor, kv: torch.Tensor, indices: torch.Tensor, sm_scale: float,
                                 d_v: int = 512, *, kv_format: str = "bf16") -> tuple[torch.Tensor, torch.Tensor]:
    """out [T, h, d_v] (q.dtype), lse [T, h] fp32 natural log. Invalid index: -1 or >= S. No valid: 0 / -inf.
    kv: float [S, 576], or (kv_format "fp8") the uint8 FP8 cache [..., 656], read as its dequantised rows."""
    T, h, _ = q.shape
    if kv_format == "fp8":
        kv = dequant_latent_fp8_reference(kv.reshape(-1, LATENT_FP8_BYTES))
    S = kv.shape[0]
    valid = (indices >= 0) & (indices < S)
    g = kv.float()[indices.long().clamp(0, max(S - 1, 0))]                      # [T, topk, 576]
    s = torch.einsum("thd,tkd->thk", q.float(), g) * sm_scale
    s = s.masked_fill(~valid[:, None, :], float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse.nan_to_num(neginf=0.0)[..., None]).nan_to_num(0.0)
    out = torch.einsum("thk,tkd->thd", p, g[..., :d_v])
    return out.to(q.dtype), lse


def quantize_latent_fp8_reference(latent: torch.Tensor) -> torch.Tensor:
    """[..., 576] float -> uint8 [..., 656]; per 128-tile scale = amax/448 rounded up to a power of two."""
    flat = latent.reshape(-1, LATENT_DIM)
    return quantize_latent_fp8(flat[:, :NOPE], flat[:, NOPE:]).view(*latent.shape[:-1], LATENT_FP8_BYTES)


def dequant_latent_fp8_reference(cache: torch.Tensor) -> torch.Tensor:
    """uint8 [..., 656] -> float32 [..., 576]."""
    return dequant_latent_fp8(cache)


def sparse_mla_decode_reference(q: torch.Tensor, cache: torch.Tensor, indices: torch.Tensor, sm_scale: float,
                                d_v: int = 512, *, kv_format: str = "bf16") -> tuple[torch.Tensor, torch.Tensor]:
    """Decode over a paged cache [num_blocks, page_size, 576 | 656]; indices are global slot ids."""
    flat = cache.reshape(-1, cache.shape[-1])
    kv = dequant_latent_fp8_reference(flat) if kv_format == "fp8" else flat.float()
    out, lse = sparse_mla_prefill_reference(q.float(), kv, indices, sm_scale, d_v)
    return out.to(q.dtype), lse

