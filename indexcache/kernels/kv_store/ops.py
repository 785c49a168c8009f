"""Cache writes: indexer FP8 key cache (8448-B pages of 64 tokens) and the MLA latent cache (bf16 576 / FP8 656 B).

Layouts are in ``indexcache.kernels.formats``. Public functions run the Triton kernel on CUDA tensors (or under
TRITON_INTERPRET=1) and the PyTorch reference otherwise. Slots: ``page * page_size + offset``; -1 = skip.
"""
from __future__ import annotations

import torch

from indexcache.kernels._dispatch import use_triton
from indexcache.kernels.formats import INDEX_PAGE_BYTES, LATENT_DIM, LATENT_FP8_BYTES, check_indexer_cache
from indexcache.kernels.indexer.reference import hadamard_128
from indexcache.kernels.kv_store.reference import (
    check_latent_inputs,
    store_indexer_k_ref,
    store_latent_bf16_ref,
    store_latent_fp8_ref,
)


def new_indexer_cache(num_pages: int, device=None) -> torch.Tensor:
    """An empty indexer key cache, uint8 [num_pages, 8448]."""
    return torch.zeros(num_pages, INDEX_PAGE_BYTES, dtype=torch.uint8, device=device)


def _check_slots(name, slot_mapping, t):
    if slot_mapping.dim() != 1 or slot_mapping.shape[0] != t or slot_mapping.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{name}: slot_mapping must be [T]=({t},) int64/int32, got {tuple(slot_mapping.shape)} {slot_mapping.dtype}")


def store_indexer_k(kv_cache, slot_mapping, k, *, hadamard: bool = False):
    """Quantise k [T,128] (bf16/fp16/fp32) per token to e4m3 + power-of-two fp32 scale and write it at slot_mapping."""
    check_indexer_cache(kv_cache, "store_indexer_k: kv_cache")
    if k.dim() != 2 or k.shape[1] != 128 or not k.dtype.is_floating_point:
        raise ValueError(f"store_indexer_k: k must be [T,128] float, got {tuple(k.shape)} {k.dtype}")
    _check_slots("store_indexer_k", slot_mapping, k.shape[0])
    if use_triton(k):
        from indexcache.kernels.kv_store.triton import store_indexer_k_triton

        if hadamard:
            k = hadamard_128(k.float())
        return store_indexer_k_triton(kv_cache, slot_mapping, k)
    return store_indexer_k_ref(kv_cache, slot_mapping, k, hadamard=hadamard)


def store_latent_bf16(cache, slot_mapping, ckv, kpe):
    """cache [blocks, page_size, 576] bf16; row slot <- ckv [T,512] | kpe [T,64] (cast to bf16)."""
    check_latent_inputs("store_latent_bf16", cache, slot_mapping, ckv, kpe, LATENT_DIM, torch.bfloat16)
    _check_slots("store_latent_bf16", slot_mapping, ckv.shape[0])
    if use_triton(ckv):
        from indexcache.kernels.kv_store.triton import store_latent_bf16_triton

        return store_latent_bf16_triton(cache, slot_mapping, ckv, kpe)
    return store_latent_bf16_ref(cache, slot_mapping, ckv, kpe)


def store_latent_fp8(cache, slot_mapping, ckv, kpe):
    """cache uint8 [blocks, page_size, 656] FlashMLA FP8 rows: e4m3 c_kv (4 tiles of 128, power-of-two scales) | 4 fp32 scales | bf16 k_pe."""
    check_latent_inputs("store_latent_fp8", cache, slot_mapping, ckv, kpe, LATENT_FP8_BYTES, torch.uint8)
    _check_slots("store_latent_fp8", slot_mapping, ckv.shape[0])
    if use_triton(ckv):
        from indexcache.kernels.kv_store.triton import store_latent_fp8_triton

        return store_latent_fp8_triton(cache, slot_mapping, ckv, kpe)
    return store_latent_fp8_ref(cache, slot_mapping, ckv, kpe)
