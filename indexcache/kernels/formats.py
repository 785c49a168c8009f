"""The byte formats the kernels read and write, defined once: dimensions, the FP8 scale rule, the two cache layouts.

FP8 is e4m3fn with one power-of-two ("ue8m0") fp32 scale per 128-vector: scale = 2^ceil(log2(max(amax, 1e-4) / 448)).

Indexer key cache (DeepGEMM ``fp8_paged_mqa_logits`` layout): ``uint8 [num_pages, 8448]``; page p holds 64 tokens:
bytes [0, 8192) are the 64 x 128 e4m3 keys (token o at o*128), bytes [8192, 8448) the 64 fp32 scales (token o at
8192 + 4*o), 132 B per token. ``view(num_pages, 64, 1, 132)`` is the same memory DeepGEMM names. Slot = page*64 + offset.

MLA latent cache, FP8 (FlashMLA, 656 B/token): bytes [0, 512) e4m3 c_kv, [512, 528) four fp32 scales (one per
128-tile, value = fp8 * scale), [528, 656) 64 bf16 k_pe. BF16: ``[blocks, page_size, 576]`` = c_kv (512) | k_pe (64).

The Triton kernels import the integer constants below (as ``tl.constexpr``); the torch functions here are the
encoders/decoders the references, the engine and the tests share.
"""
from __future__ import annotations

import torch

PAGE = 64                        # tokens per page of the paged caches
INDEX_DIM = 128                  # indexer head dim (one FP8 scale per key)
INDEX_ROW_BYTES = INDEX_DIM + 4  # 132: e4m3 key + fp32 scale
INDEX_PAGE_BYTES = PAGE * INDEX_ROW_BYTES  # 8448
INDEX_SCALES_AT = PAGE * INDEX_DIM         # 8192: byte offset of a page's scales
NOPE = 512                       # c_kv (the value) dims
ROPE = 64                        # k_pe dims
LATENT_DIM = NOPE + ROPE         # 576
LATENT_TILES = NOPE // 128       # 4 FP8 tiles of c_kv, one scale each
LATENT_SCALES_AT = NOPE          # 512: byte offset of the four fp32 scales in an FP8 latent row
LATENT_ROPE_AT = NOPE + 4 * LATENT_TILES   # 528: byte offset of the bf16 k_pe
LATENT_FP8_BYTES = LATENT_ROPE_AT + 2 * ROPE  # 656
FP8_MAX = 448.0
AMAX_FLOOR = 1e-4

assert INDEX_PAGE_BYTES == 8448 and LATENT_FP8_BYTES == 656 and LATENT_DIM == 576


def pow2_ceil(v: torch.Tensor) -> torch.Tensor:
    """Smallest power of two >= v (v > 0), exact (frexp, no log2 rounding)."""
    m, e = torch.frexp(v)
    e = torch.where(m == 0.5, e - 1, e)
    return torch.ldexp(torch.ones_like(v), e)


def quant_scale(amax: torch.Tensor) -> torch.Tensor:
    """ue8m0 scale for a group with max-abs ``amax``: 2^ceil(log2(max(amax,1e-4)/448))."""
    return pow2_ceil(amax.float().clamp_min(AMAX_FLOOR) / FP8_MAX)


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise each 128-vector of x (last dim) to e4m3 with its own power-of-two scale. Returns (x_fp8, scale)."""
    xf = x.float()
    scale = quant_scale(xf.abs().amax(-1))
    xq = (xf / scale.unsqueeze(-1)).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return xq, scale


def check_indexer_cache(kv_cache: torch.Tensor, name: str = "kv_cache"):
    if kv_cache.dim() != 2 or kv_cache.shape[1] != INDEX_PAGE_BYTES or kv_cache.dtype != torch.uint8:
        raise ValueError(f"{name}: expected uint8 [num_pages, {INDEX_PAGE_BYTES}], got {tuple(kv_cache.shape)} "
                         f"{kv_cache.dtype}")
    if not kv_cache.is_contiguous():
        raise ValueError(f"{name}: must be contiguous")


def cache_views(kv_cache: torch.Tensor):
    """(keys uint8 [pages, 64, 128], scales fp32 [pages, 64]) views of the indexer cache."""
    keys = kv_cache[:, :INDEX_SCALES_AT].view(-1, PAGE, INDEX_DIM)
    scales = kv_cache.view(torch.float32)[:, INDEX_SCALES_AT // 4:]
    return keys, scales


def gather_indexer_k(kv_cache, slots):
    """(k_fp8 [N,128] e4m3, k_scale [N] fp32) of the given slots (int tensor, all >= 0)."""
    check_indexer_cache(kv_cache)
    slots = slots.long()
    keys, scales = cache_views(kv_cache)
    return keys[slots // PAGE, slots % PAGE].view(torch.float8_e4m3fn), scales[slots // PAGE, slots % PAGE]


def quantize_latent_fp8(ckv, kpe) -> torch.Tensor:
    """[T,512], [T,64] -> uint8 [T,656] rows in the FlashMLA FP8 format."""
    t = ckv.shape[0]
    tiles = ckv.float().view(t, LATENT_TILES, 128)
    scale = quant_scale(tiles.abs().amax(-1))  # [T,4]
    q = (tiles / scale[..., None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).view(torch.uint8).view(t, NOPE)
    return torch.cat([q, scale.contiguous().view(torch.uint8), kpe.to(torch.bfloat16).contiguous().view(torch.uint8)], 1)


def dequant_latent_fp8(cache_rows: torch.Tensor, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 [..., 656] FlashMLA FP8 rows -> [..., 576] (c_kv dequantised | k_pe) in out_dtype."""
    if cache_rows.shape[-1] != LATENT_FP8_BYTES or cache_rows.dtype != torch.uint8:
        raise ValueError(f"dequant_latent_fp8: expected uint8 [..., {LATENT_FP8_BYTES}], got "
                         f"{tuple(cache_rows.shape)} {cache_rows.dtype}")
    lead = cache_rows.shape[:-1]
    r = cache_rows.reshape(-1, LATENT_FP8_BYTES).contiguous()
    q = r[:, :NOPE].view(torch.float8_e4m3fn).float().view(-1, LATENT_TILES, 128)
    scale = r[:, LATENT_SCALES_AT:LATENT_ROPE_AT].contiguous().view(torch.float32)
    kpe = r[:, LATENT_ROPE_AT:].contiguous().view(torch.bfloat16).float()
    out = torch.cat([(q * scale[..., None]).view(-1, NOPE), kpe], 1)
    return out.to(out_dtype).view(*lead, LATENT_DIM)
