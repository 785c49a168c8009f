"""PyTorch references for the cache writes (layouts in ``indexcache.kernels.formats``)."""
from __future__ import annotations

import torch

from indexcache.kernels.formats import (
    LATENT_DIM,
    LATENT_FP8_BYTES,
    NOPE,
    PAGE,
    ROPE,
    cache_views,
    check_indexer_cache,
    dequant_latent_fp8,
    gather_indexer_k,
    quantize_latent_fp8,
    quantize_rows,
)
from indexcache.kernels.indexer.reference import hadamard_128

__all__ = ["store_indexer_k_ref", "store_latent_bf16_ref", "store_latent_fp8_ref", "check_latent_inputs",
           "gather_indexer_k", "quantize_latent_fp8", "dequant_latent_fp8"]


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
    check_latent_inputs("store_latent_bf16", cache, slot_mapping, ckv, kpe, LATENT_DIM, torch.bfloat16)
    keep = slot_mapping >= 0
    rows = cache.view(-1, LATENT_DIM)
    rows[slot_mapping[keep].long()] = torch.cat([ckv[keep], kpe[keep]], 1).to(torch.bfloat16)
    return cache


def store_latent_fp8_ref(cache, slot_mapping, ckv, kpe):
    check_latent_inputs("store_latent_fp8", cache, slot_mapping, ckv, kpe, LATENT_FP8_BYTES, torch.uint8)
    keep = slot_mapping >= 0
    rows = cache.view(-1, LATENT_FP8_BYTES)
    rows[slot_mapping[keep].long()] = quantize_latent_fp8(ckv[keep], kpe[keep])
    return cache
