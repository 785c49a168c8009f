"""Triton cache-write kernels: quantise-and-scatter one launch per call (layouts in ``indexcache.kernels.formats``).

Scales are computed from the fp32 bit pattern (exact power of two, no division), so the bytes written equal the
PyTorch reference bit for bit. Under the Triton interpreter the fp32->e4m3 cast is emulated with integer
round-to-nearest-even (the interpreter's own cast is wrong); on the GPU the hardware cast (satfinite, RNE) is used.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from indexcache.kernels._dispatch import interpreting
from indexcache.kernels import formats as F

# the byte layouts as compile-time constants (element offsets in the uint8 / fp32 / bf16 views of a row or page)
_PAGE: tl.constexpr = tl.constexpr(F.PAGE)
_PAGE_BYTES: tl.constexpr = tl.constexpr(F.INDEX_PAGE_BYTES)
_PAGE_F32: tl.constexpr = tl.constexpr(F.INDEX_PAGE_BYTES // 4)
_SCALES_F32: tl.constexpr = tl.constexpr(F.INDEX_SCALES_AT // 4)
_ROW: tl.constexpr = tl.constexpr(F.LATENT_FP8_BYTES)
_ROW_F32: tl.constexpr = tl.constexpr(F.LATENT_FP8_BYTES // 4)
_ROW_BF16: tl.constexpr = tl.constexpr(F.LATENT_FP8_BYTES // 2)
_LSCALES_F32: tl.constexpr = tl.constexpr(F.LATENT_SCALES_AT // 4)
_LROPE_BF16: tl.constexpr = tl.constexpr(F.LATENT_ROPE_AT // 2)
_LATENT: tl.constexpr = tl.constexpr(F.LATENT_DIM)


@triton.jit
def _pow2_scale(amax):
    """(scale, 1/scale) with scale = 2^ceil(log2(max(amax,1e-4)/448)), exact."""
    a = tl.maximum(amax, 1e-4)
    bits = a.to(tl.int32, bitcast=True)
    e = ((bits >> 23) & 0xFF) - 127
    mant = bits & 0x7FFFFF
    se = tl.where(mant <= 0x600000, e - 8, e - 7)  # 448 = 1.75 * 2^8
    scale = ((se + 127) << 23).to(tl.float32, bitcast=True)
    inv = ((127 - se) << 23).to(tl.float32, bitcast=True)
    return scale, inv


@triton.jit
def _e4m3_bits(y, EMULATE: tl.constexpr):
    """uint8 e4m3fn bits of fp32 y in [-448, 448], round to nearest even."""
    if EMULATE:
        bits = y.to(tl.int32, bitcast=True)
        sign = (bits >> 31) & 1
        a = bits & 0x7FFFFFFF
        r = (a + 0x7FFFF + ((a >> 20) & 1)) & -1048576  # keep 3 mantissa bits, RNE
        normal = (((r >> 23) - 120) << 3) | ((r >> 20) & 7)
        af = a.to(tl.float32, bitcast=True)
        sub = ((af * 512.0 + 8388608.0) - 8388608.0).to(tl.int32)  # subnormals: multiples of 2^-9, RNE
        mag = tl.where(af >= 0.015625, normal, sub)
        return (mag | (sign << 7)).to(tl.uint8)
    else:
        return y.to(tl.float8e4nv).to(tl.uint8, bitcast=True)


@triton.jit(do_not_specialize=["T"])  # tokens per step vary (chunks, decode batches)
def _store_indexer_k_kernel(k_ptr, slot_ptr, c8_ptr, cs_ptr, T, stride_k,
                            BT: tl.constexpr, EMULATE: tl.constexpr):
    D: tl.constexpr = 128
    rows = tl.program_id(0) * BT + tl.arange(0, BT)
    rmask = rows < T
    slot = tl.load(slot_ptr + rows, mask=rmask, other=-1).to(tl.int64)
    ok = rmask & (slot >= 0)
    offs_d = tl.arange(0, D)
    x = tl.load(k_ptr + rows.to(tl.int64)[:, None] * stride_k + offs_d[None, :], mask=ok[:, None], other=0.0)
    x = x.to(tl.float32)
    scale, inv = _pow2_scale(tl.max(tl.abs(x), axis=1))
    y = tl.minimum(tl.maximum(x * inv[:, None], -448.0), 448.0)
    q = _e4m3_bits(y, EMULATE)
    page = slot // _PAGE
    off = slot % _PAGE
    tl.store(c8_ptr + (page * _PAGE_BYTES + off * D)[:, None] + offs_d[None, :], q, mask=ok[:, None])
    tl.store(cs_ptr + page * _PAGE_F32 + _SCALES_F32 + off, scale, mask=ok)


def store_indexer_k_triton(kv_cache, slot_mapping, k):
    t = k.shape[0]
    if t == 0:
        return kv_cache
    if k.stride(1) != 1:
        k = k.contiguous()
    bt = 16
    _store_indexer_k_kernel[(triton.cdiv(t, bt),)](
        k, slot_mapping, kv_cache, kv_cache.view(torch.float32), t, k.stride(0), BT=bt, EMULATE=interpreting(),
        num_warps=4)
    return kv_cache


@triton.jit(do_not_specialize=["T"])
def _store_latent_fp8_kernel(ckv_ptr, kpe_ptr, slot_ptr, c8_ptr, c32_ptr, c16_ptr, T, stride_c, stride_p,
                             BT: tl.constexpr, EMULATE: tl.constexpr):
    rows = tl.program_id(0) * BT + tl.arange(0, BT)
    rmask = rows < T
    slot = tl.load(slot_ptr + rows, mask=rmask, other=-1).to(tl.int64)
    ok = rmask & (slot >= 0)
    r64 = rows.to(tl.int64)
    offs_c = tl.arange(0, 512)
    x = tl.load(ckv_ptr + r64[:, None] * stride_c + offs_c[None, :], mask=ok[:, None], other=0.0).to(tl.float32)
    x3 = tl.reshape(x, [BT, 4, 128])
    scale, inv = _pow2_scale(tl.max(tl.abs(x3), axis=2))  # [BT, 4]
    y = tl.minimum(tl.maximum(x3 * inv[:, :, None], -448.0), 448.0)
    q = tl.reshape(_e4m3_bits(y, EMULATE), [BT, 512])
    tl.store(c8_ptr + slot[:, None] * _ROW + offs_c[None, :], q, mask=ok[:, None])
    offs_s = tl.arange(0, 4)
    tl.store(c32_ptr + slot[:, None] * _ROW_F32 + _LSCALES_F32 + offs_s[None, :], scale, mask=ok[:, None])
    offs_p = tl.arange(0, 64)
    p = tl.load(kpe_ptr + r64[:, None] * stride_p + offs_p[None, :], mask=ok[:, None], other=0.0)
    tl.store(c16_ptr + slot[:, None] * _ROW_BF16 + _LROPE_BF16 + offs_p[None, :], p.to(tl.bfloat16), mask=ok[:, None])


def _unit_stride_rows(ckv, kpe):
    """ckv and kpe with unit column stride (the kernels index rows by their row stride)."""
    return (ckv if ckv.stride(1) == 1 else ckv.contiguous()), (kpe if kpe.stride(1) == 1 else kpe.contiguous())


def store_latent_fp8_triton(cache, slot_mapping, ckv, kpe):
    t = ckv.shape[0]
    if t == 0:
        return cache
    ckv, kpe = _unit_stride_rows(ckv, kpe)
    flat = cache.view(-1, F.LATENT_FP8_BYTES)
    bt = 8
    _store_latent_fp8_kernel[(triton.cdiv(t, bt),)](
        ckv, kpe, slot_mapping, flat, flat.view(torch.float32), flat.view(torch.bfloat16), t, ckv.stride(0),
        kpe.stride(0), BT=bt, EMULATE=interpreting(), num_warps=4)
    return cache


@triton.jit(do_not_specialize=["T"])
def _store_latent_bf16_kernel(ckv_ptr, kpe_ptr, slot_ptr, c_ptr, T, stride_c, stride_p, BT: tl.constexpr):
    rows = tl.program_id(0) * BT + tl.arange(0, BT)
    rmask = rows < T
    slot = tl.load(slot_ptr + rows, mask=rmask, other=-1).to(tl.int64)
    ok = rmask & (slot >= 0)
    r64 = rows.to(tl.int64)
    offs_c = tl.arange(0, 512)
    x = tl.load(ckv_ptr + r64[:, None] * stride_c + offs_c[None, :], mask=ok[:, None], other=0.0)
    tl.store(c_ptr + slot[:, None] * _LATENT + offs_c[None, :], x.to(tl.bfloat16), mask=ok[:, None])
    offs_p = tl.arange(0, 64)
    p = tl.load(kpe_ptr + r64[:, None] * stride_p + offs_p[None, :], mask=ok[:, None], other=0.0)
    tl.store(c_ptr + slot[:, None] * _LATENT + 512 + offs_p[None, :], p.to(tl.bfloat16), mask=ok[:, None])


def store_latent_bf16_triton(cache, slot_mapping, ckv, kpe):
    t = ckv.shape[0]
    if t == 0:
        return cache
    ckv, kpe = _unit_stride_rows(ckv, kpe)
    bt = 8
    _store_latent_bf16_kernel[(triton.cdiv(t, bt),)](
        ckv, kpe, slot_mapping, cache, t, ckv.stride(0), kpe.stride(0), BT=bt, num_warps=4)
    return cache

