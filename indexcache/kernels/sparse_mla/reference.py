"""Plain PyTorch sparse MLA (absorbed / MQA mode) and the FlashMLA FP8 latent-cache format, as oracles.

FP8 cache entry, 656 bytes per token: [0, 512) e4m3 c_kv, [512, 528) four fp32 scales (one per 128-element
tile, value = fp8 * scale), [528, 656) 64 bf16 k_pe.
"""
from __future__ import annotations

import math

import torch

D_QK = 576
D_NOPE = 512
D_ROPE = 64
FP8_BYTES = 656


def sparse_mla_prefill_reference(q: torch.Tensor, kv: torch.Tensor, indices: torch.Tensor, sm_scale: float,
                                 d_v: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """out [T, h, d_v] (q.dtype), lse [T, h] fp32 natural log. Invalid index: -1 or >= S. No valid: 0 / -inf."""
    T, h, _ = q.shape
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
    x = latent.float()
    nope = x[..., :D_NOPE].unflatten(-1, (4, 128))
    amax = nope.abs().amax(-1).clamp(min=1e-4)
    scale = torch.exp2(torch.ceil(torch.log2(amax / 448.0)))
    q8 = (nope / scale[..., None]).clamp(-448, 448).to(torch.float8_e4m3fn).flatten(-2)
    return torch.cat([q8.view(torch.uint8), scale.contiguous().view(torch.uint8),
                      x[..., D_NOPE:].to(torch.bfloat16).contiguous().view(torch.uint8)], dim=-1)


def dequant_latent_fp8_reference(cache: torch.Tensor) -> torch.Tensor:
    """uint8 [..., 656] -> float32 [..., 576]."""
    nope = cache[..., :512].contiguous().view(torch.float8_e4m3fn).float()
    scale = cache[..., 512:528].contiguous().view(torch.float32)
    pe = cache[..., 528:656].contiguous().view(torch.bfloat16).float()
    nope = (nope.unflatten(-1, (4, 128)) * scale[..., None]).flatten(-2)
    return torch.cat([nope, pe], dim=-1)


def sparse_mla_decode_reference(q: torch.Tensor, cache: torch.Tensor, indices: torch.Tensor, sm_scale: float,
                                d_v: int = 512, *, kv_format: str = "bf16") -> tuple[torch.Tensor, torch.Tensor]:
    """Decode over a paged cache [num_blocks, page_size, 576 | 656]; indices are global slot ids."""
    flat = cache.reshape(-1, cache.shape[-1])
    kv = dequant_latent_fp8_reference(flat) if kv_format == "fp8" else flat.float()
    out, lse = sparse_mla_prefill_reference(q.float(), kv, indices, sm_scale, d_v)
    return out.to(q.dtype), lse


LOG2E = 1.0 / math.log(2.0)
