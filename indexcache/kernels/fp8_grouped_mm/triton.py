"""Triton grouped GEMM of 1x128-quantised fp8 activations against FP8 block-scaled expert weights (rows sorted by
expert, ragged groups).

Each program computes a [BLOCK_M, BLOCK_N] tile of one expert's rows. K is walked in 128-wide steps, so each step
is one fp8 x fp8 dot on the FP8 tensor cores times one factor per row: the row's activation group scale times the
tile's one 128x128 weight block scale (BLOCK_N divides 128, so a tile never straddles two weight blocks). Each
step's dot is added into an fp32 accumulator: on Hopper, Triton's fp8 dots accumulate with reduced precision
inside the dot (its default there), so promoting to fp32 every 128 products bounds that error, as DeepSeek's FP8
GEMMs do. The FP8 weights are read as they are, never written back dequantised.
Launch order: one 1-D grid, tiles grouped GROUP_M at a time (the 128-row activation tiles of a group are reused
across every N block while they sit in L2, and consecutive groups share an expert's weights); a grid with the
N blocks outermost re-read all activations from memory once per N block.
Tiles are mapped to (expert, first row) on the device (``tile_map``), from a static upper bound on their number
(cdiv(M, BLOCK_M) + E): no host sync, so the launch can sit in a CUDA graph. Spare tiles exit at once.
Block sizes come from a small table by the mean rows per expert (``config_for``), chosen for an H200; no autotune.
On CPU (interpreter) the tiles are converted to fp32 before the dot (the interpreter's fp8 maths is wrong).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_K = 128  # one activation group and one weight block per K step
GROUP_M = 8


def config_for(m: int, num_experts: int) -> dict:
    """Block sizes by the mean rows per expert (host shapes only): 64-row tiles when experts get few rows (deepseek
    at a few hundred tokens: less padding per expert), 128x128 tiles with 8 warps beyond (Hopper's wgmma: two
    warpgroups, each a 64x128 slice; 4 stages of 32 KB fp8 operands in shared memory)."""
    if m <= 64 * num_experts:
        return {"block_m": 64, "block_n": 128, "num_warps": 4, "num_stages": 4}
    return {"block_m": 128, "block_n": 128, "num_warps": 8, "num_stages": 4}


@triton.jit
def _grouped_fp8_kernel(a_ptr, sa_ptr, w_ptr, s_ptr, out_ptr, tile_e_ptr, tile_row_ptr, row_end_ptr,
                        N, K, E, NUM_TILES,
                        stride_am, stride_ak, stride_sam, stride_sak, stride_we, stride_wn, stride_wk,
                        stride_se, stride_sn, stride_sk, stride_om, stride_on,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                        DOT_F32: tl.constexpr):
    pid = tl.program_id(0)
    nb = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * nb
    first = (pid // per_group) * GROUP_M
    size = tl.minimum(NUM_TILES - first, GROUP_M)
    t = first + (pid % per_group) % size
    pn = (pid % per_group) // size
    e = tl.load(tile_e_ptr + t)
    if e < E:
        e64 = e.to(tl.int64)
        row0 = tl.load(tile_row_ptr + t)
        row_end = tl.load(row_end_ptr + e)
        rows = row0 + tl.arange(0, BLOCK_M)
        rmask = rows < row_end
        rows64 = rows.to(tl.int64)
        cols = pn * BLOCK_N + tl.arange(0, BLOCK_N)
        cmask = cols < N
        a_rows = a_ptr + rows64[:, None] * stride_am
        sa_rows = sa_ptr + rows64 * stride_sam
        w_cols = w_ptr + e64 * stride_we + cols.to(tl.int64)[None, :] * stride_wn
        s_base = s_ptr + e64 * stride_se + (pn * BLOCK_N // 128) * stride_sn
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            kmask = ks < K
            a = tl.load(a_rows + ks[None, :] * stride_ak, mask=rmask[:, None] & kmask[None, :], other=0.0)
            w = tl.load(w_cols + ks[:, None] * stride_wk, mask=kmask[:, None] & cmask[None, :], other=0.0)
            s = tl.load(s_base + (k0 // 128) * stride_sk)
            sa = tl.load(sa_rows + (k0 // 128) * stride_sak, mask=rmask, other=0.0)
            if DOT_F32:
                part = tl.dot(a.to(tl.float32), w.to(tl.float32), input_precision="ieee")
            else:
                part = tl.dot(a, w)
            acc += part * (sa[:, None] * s)
        tl.store(out_ptr + rows64[:, None] * stride_om + cols[None, :] * stride_on,
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


def fp8_grouped_mm_triton(a, counts, w, scale_inv, a_scale, *, out=None, out_dtype=torch.bfloat16, config=None):
    """Inputs already checked: a fp8 [M, K] with ``a_scale`` fp32 [M, ceil(K/128)] (any strides). ``out`` [M, N]
    optional (tests pass a NaN-filled one). ``config``: block sizes (default ``config_for``; block_n divides 128)."""
    m, k = a.shape
    E, n, _ = w.shape
    if out is None:
        out = torch.empty(m, n, dtype=out_dtype, device=a.device)
    if m == 0:
        return out
    cfg = dict(config or config_for(m, E))
    block_m, block_n = cfg.pop("block_m"), cfg.pop("block_n")
    if 128 % block_n:
        raise ValueError(f"fp8_grouped_mm: block_n must divide 128, got {block_n}")
    te, row, ends = tile_map(counts, m, block_m)
    grid = (te.shape[0] * triton.cdiv(n, block_n),)
    _grouped_fp8_kernel[grid](a, a_scale, w, scale_inv, out, te, row, ends, n, k, E, te.shape[0],
                              a.stride(0), a.stride(1), *a_scale.stride(), *w.stride(), *scale_inv.stride(),
                              out.stride(0), out.stride(1),
                              BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=BLOCK_K, GROUP_M=GROUP_M,
                              DOT_F32=not a.is_cuda, **cfg)
    return out
