"""Sparse MLA attention in absorbed (MQA) mode: prefill over a flat latent KV, decode over a paged cache.

Triton on CUDA tensors (or on CPU under TRITON_INTERPRET=1), the PyTorch reference otherwise.
"""
from __future__ import annotations

import math

import torch

from indexcache.kernels._dispatch import interpreting, use_triton
from indexcache.kernels.sparse_mla.reference import (D_QK, FP8_BYTES, dequant_latent_fp8_reference,
                                                     quantize_latent_fp8_reference, sparse_mla_decode_reference,
                                                     sparse_mla_prefill_reference)

_FLOATS = (torch.bfloat16, torch.float16, torch.float32)
# tuning knobs (benchmarks may override): heads per program cap, tokens per step, warps, pipeline stages
PREFILL_CFG = {"hb_max": 64, "bt": 64, "num_warps": 8, "num_stages": 2}
PREFILL_CFG_FEW_HEADS = {"hb_max": 64, "bt": 64, "num_warps": 4, "num_stages": 2}  # HB <= 32 (H200 sweep, h=20)
DECODE_CFG = {"bf16": {"hb_max": 64, "bt": 64, "num_warps": 8, "num_stages": 2, "target_programs": 264},
              "fp8": {"hb_max": 64, "bt": 32, "num_warps": 8, "num_stages": 1, "target_programs": 264}}


def _launch(kernel, grid, args, kw, cfg):
    """Launch with cfg's tile/stages; if the compiled kernel needs more shared memory than the chip has, retry
    with 32-token tiles and no pipelining, and keep that for later calls."""
    try:
        kernel[grid](*args, **kw, BT=kw_bt(cfg), num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    except triton.runtime.errors.OutOfResources:
        if cfg["bt"] == 32 and cfg["num_stages"] == 1:
            raise
        cfg.update(bt=32, num_stages=1)
        kernel[grid](*args, **kw, BT=kw_bt(cfg), num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])


def kw_bt(cfg):
    return 16 if interpreting() else cfg["bt"]


def _hb(h, cap):
    return min(cap, max(16, 1 << (h - 1).bit_length()))


def _check_q(fn, q, d_v):
    if q.dim() != 3 or q.shape[-1] != D_QK:
        raise ValueError(f"{fn}: q must be [*, h, {D_QK}], got shape {tuple(q.shape)}")
    if q.dtype not in _FLOATS:
        raise ValueError(f"{fn}: q dtype must be bf16/fp16/fp32, got {q.dtype}")
    if d_v != 512:
        raise ValueError(f"{fn}: only d_v=512 is supported, got d_v={d_v}")


def _check_idx(fn, indices, n, device):
    if indices.dim() != 2 or indices.shape[0] != n:
        raise ValueError(f"{fn}: indices must be [{n}, topk], got shape {tuple(indices.shape)}")
    if indices.dtype != torch.int32:
        raise ValueError(f"{fn}: indices must be int32, got {indices.dtype}")
    if indices.device != device:
        raise ValueError(f"{fn}: indices on {indices.device}, q on {device}")


def sparse_mla_prefill(q: torch.Tensor, kv: torch.Tensor, indices: torch.Tensor, sm_scale: float,
                       d_v: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """q [T, h, 576], kv [S, 576] (same dtype), indices [T, topk] int32 rows of kv (-1 or >= S: skipped).

    Returns out [T, h, 512] in q.dtype and lse [T, h] fp32 (natural log); rows with no valid index give 0 / -inf.
    """
    _check_q("sparse_mla_prefill", q, d_v)
    if kv.dim() != 2 or kv.shape[1] != D_QK:
        raise ValueError(f"sparse_mla_prefill: kv must be [S, {D_QK}], got shape {tuple(kv.shape)}")
    if kv.dtype != q.dtype:
        raise ValueError(f"sparse_mla_prefill: kv dtype {kv.dtype} differs from q dtype {q.dtype}")
    T, H, _ = q.shape
    _check_idx("sparse_mla_prefill", indices, T, q.device)
    if not use_triton(q):
        return sparse_mla_prefill_reference(q, kv, indices, sm_scale, d_v)
    from indexcache.kernels.sparse_mla.triton_sparse_mla import _sparse_mla_prefill_kernel

    q = q if q.stride(-1) == 1 else q.contiguous()
    kv = kv if kv.stride(-1) == 1 else kv.contiguous()
    indices = indices.contiguous()
    out = torch.empty((T, H, 512), dtype=q.dtype, device=q.device)
    lse = torch.empty((T, H), dtype=torch.float32, device=q.device)
    if T == 0:
        return out, lse
    cfg = PREFILL_CFG if _hb(H, PREFILL_CFG["hb_max"]) > 32 else PREFILL_CFG_FEW_HEADS
    hb = _hb(H, cfg["hb_max"])
    interp = interpreting()
    grid = (T, triton.cdiv(H, hb))
    _launch(_sparse_mla_prefill_kernel, grid,
            (q, kv, indices, out, lse, kv.shape[0], H, indices.shape[1], sm_scale * 1.4426950408889634,
             q.stride(0), q.stride(1), kv.stride(0), indices.stride(0), out.stride(0), out.stride(1)),
            dict(HB=hb, UPCAST=interp), cfg)
    return out, lse


def sparse_mla_decode(q: torch.Tensor, cache: torch.Tensor, indices: torch.Tensor, sm_scale: float,
                      d_v: int = 512, *, kv_format: str = "bf16",
                      num_splits: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """q [B, h, 576]; cache [num_blocks, page_size, 576] (kv_format "bf16", dtype of q) or uint8
    [num_blocks, page_size, 656] ("fp8", FlashMLA layout); indices [B, topk] int32 global slot ids
    (block * page_size + offset), -1 = invalid. Returns out [B, h, 512] (q.dtype), lse [B, h] fp32 natural log.
    """
    _check_q("sparse_mla_decode", q, d_v)
    if kv_format not in ("bf16", "fp8"):
        raise ValueError(f"sparse_mla_decode: kv_format must be 'bf16' or 'fp8', got {kv_format!r}")
    width = FP8_BYTES if kv_format == "fp8" else D_QK
    if cache.dim() != 3 or cache.shape[-1] != width:
        raise ValueError(f"sparse_mla_decode: cache must be [num_blocks, page_size, {width}] for kv_format="
                         f"{kv_format!r}, got shape {tuple(cache.shape)}")
    if kv_format == "fp8" and cache.dtype != torch.uint8:
        raise ValueError(f"sparse_mla_decode: fp8 cache must be uint8, got {cache.dtype}")
    if kv_format == "bf16" and cache.dtype != q.dtype:
        raise ValueError(f"sparse_mla_decode: cache dtype {cache.dtype} differs from q dtype {q.dtype}")
    if not cache.is_contiguous():
        raise ValueError("sparse_mla_decode: cache must be contiguous (slot id = row of the flattened cache)")
    B, H, _ = q.shape
    _check_idx("sparse_mla_decode", indices, B, q.device)
    if not use_triton(q):
        return sparse_mla_decode_reference(q, cache, indices, sm_scale, d_v, kv_format=kv_format)
    from indexcache.kernels.sparse_mla import triton_sparse_mla as tm

    q = q if q.stride(-1) == 1 else q.contiguous()
    indices = indices.contiguous()
    topk = indices.shape[1]
    S = cache.shape[0] * cache.shape[1]
    out = torch.empty((B, H, 512), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H), dtype=torch.float32, device=q.device)
    if B == 0:
        return out, lse
    cfg = DECODE_CFG[kv_format]
    interp = interpreting()
    hb = _hb(H, cfg["hb_max"])
    nhb = triton.cdiv(H, hb)
    bt = 16 if interp else cfg["bt"]
    if num_splits is None:
        num_splits = max(1, min(triton.cdiv(topk, bt), triton.cdiv(cfg["target_programs"], B * nhb)))
    chunk = triton.cdiv(triton.cdiv(max(topk, 1), num_splits), bt) * bt
    ns = triton.cdiv(max(topk, 1), chunk)
    fp8 = kv_format == "fp8"
    flat = cache.reshape(-1, cache.shape[-1])
    u8 = flat if fp8 else cache
    f32 = flat.view(torch.float32) if fp8 else cache
    bf = flat.view(torch.bfloat16) if fp8 else cache
    common = dict(HB=hb, FP8=fp8, UPCAST=interp)
    args = (q, u8, f32, bf, flat, indices)
    tail = (S, H, topk, chunk, sm_scale * 1.4426950408889634, q.stride(0), q.stride(1), flat.stride(0),
            indices.stride(0), ns)
    if ns == 1:
        _launch(tm._sparse_mla_decode_kernel, (B, 1, nhb), (*args, out, lse, *tail), dict(DIRECT=True, **common), cfg)
        return out, lse
    part_o = torch.empty((B, ns, H, 512), dtype=torch.float32, device=q.device)
    part_l = torch.empty((B, ns, H), dtype=torch.float32, device=q.device)
    _launch(tm._sparse_mla_decode_kernel, (B, ns, nhb), (*args, part_o, part_l, *tail), dict(DIRECT=False, **common),
            cfg)
    tm._combine_kernel[(B, H)](part_o, part_l, out, lse, H, ns, NSP=triton.next_power_of_2(ns), num_warps=4)
    return out, lse


import triton  # noqa: E402

__all__ = ["sparse_mla_prefill", "sparse_mla_decode", "sparse_mla_prefill_reference", "sparse_mla_decode_reference",
           "dequant_latent_fp8_reference", "quantize_latent_fp8_reference"]
_ = math
