"""PyTorch references for cache writes (DSA spec A4).

Indexer key cache (DeepGEMM ``fp8_paged_mqa_logits`` layout): ``uint8 [num_pages, 8448]``; page p holds 64 tokens:
bytes [0, 8192) are the 64 x 128 e4m3 keys (token o at o*128), bytes [8192, 8448) the 64 fp32 scales (token o at
8192 + 4*o). ``view(num_pages, 64, 1, 132)`` is the same memory DeepGEMM names. Slot = page*64 + offset.

MLA latent cache, FP8 (FlashMLA, 656 B/token): bytes 0-511 e4m3 c_kv, 512-527 four fp32 scales (one per 128-tile),
528-655 64 bf16 k_pe. BF16: ``[blocks, page_size, 576]`` = c_kv (512) | k_pe (64).
"""
from __future__ import annotations

import torch

from indexcache.kernels.indexer.reference import hadamard_128, quant_scale, quantize_rows, FP8_MAX

PAGE = 64
D = 128
PAGE_BYTES = PAGE * D + PAGE * 4  # 8448
LATENT_FP8_BYTES = 656
NOPE = 512
ROPE = 64


def check_indexer_cache(kv_cache: torch.Tensor, name: str = "kv_cache"):
    if kv_cache.dim() != 2 or kv_cache.shape[1] != PAGE_BYTES or kv_cache.dtype != torch.uint8:
        raise ValueError(f"{name}: expected uint8 [num_pages, {PAGE_BYTES}], got {tuple(kv_cache.shape)} {kv_cache.dtype}")
    if not kv_cache.is_contiguous():
        raise ValueError(f"{name}: must be contiguous")


def cache_views(kv_cache: torch.Tensor):
    """(keys uint8 [pages, 64, 128], scales fp32 [pages, 64]) views of the indexer cache."""
    keys = kv_cache[:, : PAGE * D].view(-1, PAGE, D)
    scales = kv_cache.view(torch.float32)[:, PAGE * D // 4:]
    return keys, scales


def store_indexer_k_ref(kv_cache, slot_mapping, k, *, hadamard: bool = False):
    check_indexer_cache(kv_cache)
    if hadamard:
        k = hadamard_128(k.float())
    k8, scale = quantize_rows(k)
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    keys, scales = cache_views(kv_cache)
    keys[slots // PAGE, slots % PAGE] = k8[keep].view(torch.uint8)
    scales[slots // PAGE, slots % PAGE] = scale[keep]
    return kv_cache


def gather_indexer_k(kv_cache, slots):
    """(k_fp8 [N,128] e4m3, k_scale [N] fp32) of the given slots (int tensor, all >= 0)."""
    check_indexer_cache(kv_cache)
    slots = slots.long()
    keys, scales = cache_views(kv_cache)
    return keys[slots // PAGE, slots % PAGE].view(torch.float8_e4m3fn), scales[slots // PAGE, slots % PAGE]


def check_latent_inputs(name, cache, slot_mapping, ckv, kpe, width, dtype):
    if cache.dim() != 3 or cache.shape[2] != width or cache.dtype != dtype:
        raise ValueError(f"{name}: cache must be [blocks, page_size, {width}] {dtype}, got {tuple(cache.shape)} {cache.dtype}")
    t = slot_mapping.shape[0]
    if slot_mapping.dim() != 1:
        raise ValueError(f"{name}: slot_mapping must be 1-D, got {tuple(slot_mapping.shape)}")
    if tuple(ckv.shape) != (t, NOPE):
        raise ValueError(f"{name}: ckv must be [T,{NOPE}]=({t},{NOPE}), got {tuple(ckv.shape)}")
    if tuple(kpe.shape) != (t, ROPE):
        raise ValueError(f"{name}: kpe must be [T,{ROPE}]=({t},{ROPE}), got {tuple(kpe.shape)}")
    if not cache.is_contiguous():
        raise ValueError(f"{name}: cache must be contiguous")


def store_latent_bf16_ref(cache, slot_mapping, ckv, kpe):
    check_latent_inputs("store_latent_bf16", cache, slot_mapping, ckv, kpe, NOPE + ROPE, torch.bfloat16)
    keep = slot_mapping >= 0
    rows = cache.view(-1, NOPE + ROPE)
    rows[slot_mapping[keep].long()] = torch.cat([ckv[keep], kpe[keep]], 1).to(torch.bfloat16)
    return cache


def quantize_latent_fp8(ckv, kpe) -> torch.Tensor:
    """[T,512], [T,64] -> uint8 [T,656] rows in the FlashMLA FP8 format."""
    t = ckv.shape[0]
    tiles = ckv.float().view(t, 4, 128)
    scale = quant_scale(tiles.abs().amax(-1))  # [T,4]
    q = (tiles / scale[..., None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).view(torch.uint8).view(t, NOPE)
    return torch.cat([q, scale.contiguous().view(torch.uint8), kpe.to(torch.bfloat16).contiguous().view(torch.uint8)], 1)


def store_latent_fp8_ref(cache, slot_mapping, ckv, kpe):
    check_latent_inputs("store_latent_fp8", cache, slot_mapping, ckv, kpe, LATENT_FP8_BYTES, torch.uint8)
    keep = slot_mapping >= 0
    rows = cache.view(-1, LATENT_FP8_BYTES)
    rows[slot_mapping[keep].long()] = quantize_latent_fp8(ckv[keep], kpe[keep])
    return cache


def dequant_latent_fp8(cache_rows: torch.Tensor, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 [..., 656] FlashMLA FP8 rows -> [..., 576] (c_kv dequantised | k_pe) in out_dtype."""
    if cache_rows.shape[-1] != LATENT_FP8_BYTES or cache_rows.dtype != torch.uint8:
        raise ValueError(f"dequant_latent_fp8: expected uint8 [..., {LATENT_FP8_BYTES}], got {tuple(cache_rows.shape)} {cache_rows.dtype}")
    lead = cache_rows.shape[:-1]
    r = cache_rows.reshape(-1, LATENT_FP8_BYTES).contiguous()
    q = r[:, :NOPE].view(torch.float8_e4m3fn).float().view(-1, 4, 128)
    scale = r[:, NOPE:NOPE + 16].contiguous().view(torch.float32)
    kpe = r[:, NOPE + 16:].contiguous().view(torch.bfloat16).float()
    out = torch.cat([(q * scale[..., None]).view(-1, NOPE), kpe], 1)
    return out.to(out_dtype).view(*lead, NOPE + ROPE)
