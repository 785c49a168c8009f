"""Triton grouped GEMM against FP8 block-scaled expert weights (rows sorted by expert, ragged groups).

Each program computes a [BLOCK_M, BLOCK_N] tile of one expert's rows: it walks K in 128-wide steps, loads the
activation tile and the fp8 weight tile and adds dot(a, w) * scale, where scale is the tile's one 128x128 block
scale (BLOCK_N divides 128, so a tile never straddles two weight blocks). Activations either stay bf16 (the
weight tile is converted to bf16 in registers: W8A16) or come quantised per 1x128 group (fp8 x fp8 dot on the
FP8 tensor cores, times each row's group scale: W8A8, as the FP8 linear layers). The FP8 weights are read once per tile row and never written back dequantised.
Tiles are mapped to (expert, first row) on the device (``tile_map``), from a static upper bound on their number
(cdiv(M, BLOCK_M) + E): no host sync, so the launch can sit in a CUDA graph. Spare tiles exit at once.
On CPU (interpreter) the tiles are converted to fp32 before the dot (the interpreter's bf16/fp8 maths is wrong).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_M, BLOCK_N, BLOCK_K = 64, 128, 128


@triton.jit
def _grouped_fp8_kernel(a_ptr, sa_ptr, w_ptr, s_ptr, out_ptr, tile_e_ptr, tile_row_ptr, row_end_ptr, N, K, E,
                        stride_am, stride_ak, stride_sam, stride_sak, stride_we, stride_wn, stride_wk,
                        stride_se, stride_sn, stride_sk, stride_om, stride_on,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT_F32: tl.constexpr,
                        A_FP8: tl.constexpr):
    t = tl.program_id(0)
    pn = tl.program_id(1)
    e = tl.load(tile_e_ptr + t)
    if e < E:
        e64 = e.to(tl.int64)
        row0 = tl.load(tile_row_ptr + t)
        row_end = tl.load(row_end_ptr + e)
        rows = row0 + tl.arange(0, BLOCK_M)
        rmask = rows < row_end
        cols = pn * BLOCK_N + tl.arange(0, BLOCK_N)
        cmask = cols < N
        a_rows = a_ptr + rows.to(tl.int64)[:, None] * stride_am
        w_cols = w_ptr + e64 * stride_we + cols.to(tl.int64)[None, :] * stride_wn
        s_base = s_ptr + e64 * stride_se + (pn * BLOCK_N // 128) * stride_sn
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            kmask = ks < K
            a = tl.load(a_rows + ks[None, :] * stride_ak, mask=rmask[:, None] & kmask[None, :], other=0.0)
            w = tl.load(w_cols + ks[:, None] * stride_wk, mask=kmask[:, None] & cmask[None, :], other=0.0)
            s = tl.load(s_base + (k0 // 128) * stride_sk)
            if DOT_F32:
                part = tl.dot(a.to(tl.float32), w.to(tl.float32))
            elif A_FP8:
                part = tl.dot(a, w)
            else:
                part = tl.dot(a, w.to(a.dtype))
            if A_FP8:
                sa = tl.load(sa_ptr + rows.to(tl.int64) * stride_sam + (k0 // 128) * stride_sak, mask=rmask, other=0.0)
                acc += part * (sa[:, None] * s)
            else:
                acc += part * s
        tl.store(out_ptr + rows.to(tl.int64)[:, None] * stride_om + cols[None, :] * stride_on,
                 acc.to(out_ptr.dtype.element_ty), mask=rmask[:, None] & cmask[None, :])


def tile_map(counts: torch.Tensor, m: int, block_m: int):
    """(expert of each tile or E for spare ones, first row of each tile, end row of each expert), on the device."""
    E = counts.shape[0]
    c = counts.to(torch.int64)
    ends = c.cumsum(0)
    starts = ends - c
    tiles = (c + block_m - 1) // block_m
    tile_end = tiles.cumsum(0)
    bound = triton.cdiv(m, block_m) + E
    t = torch.arange(bound, device=counts.device)
    te = torch.searchsorted(tile_end, t, right=True)              # E for tiles past the last expert's
    te_c = te.clamp(max=E - 1)
    first_tile = tile_end[te_c] - tiles[te_c]
    row = starts[te_c] + (t - first_tile) * block_m
    return te.to(torch.int32), row.to(torch.int32), ends.to(torch.int32)


def fp8_grouped_mm_triton(a, counts, w, scale_inv, *, a_scale=None, out=None, out_dtype=None, block_m=BLOCK_M,
                          block_n=BLOCK_N):
    """Inputs already checked. ``a_scale``: fp32 [M, ceil(K/128)] when ``a`` is fp8. ``out`` [M, N] optional
    (tests pass a NaN-filled one). block_n divides 128."""
    m, k = a.shape
    E, n, _ = w.shape
    if out is None:
        out = torch.empty(m, n, dtype=out_dtype or a.dtype, device=a.device)
    if m == 0:
        return out
    te, row, ends = tile_map(counts, m, block_m)
    a_fp8 = a_scale is not None
    dot_f32 = not a.is_cuda or a.dtype == torch.float32
    sa = a_scale if a_fp8 else scale_inv  # an unused pointer for bf16 activations
    sas = a_scale.stride() if a_fp8 else (0, 0)
    grid = (te.shape[0], triton.cdiv(n, block_n))
    _grouped_fp8_kernel[grid](a, sa, w, scale_inv, out, te, row, ends, n, k, E,
                              a.stride(0), a.stride(1), *sas, *w.stride(), *scale_inv.stride(),
                              out.stride(0), out.stride(1),
                              BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=BLOCK_K, DOT_F32=dot_f32, A_FP8=a_fp8,
                              num_warps=4)
    return out
