"""Triton grouped GEMM of 1x128-quantised fp8 activations against FP8 block-scaled expert weights (rows sorted by
expert, ragged groups).

Each program computes a [BLOCK_M, BLOCK_N] tile of one expert's rows. K is walked in 128-wide steps, so each step
is one fp8 x fp8 dot on the FP8 tensor cores times the row's activation group scale and each column's 128x128
weight block scale (one block row per 128 columns: BLOCK_N divides 128 or is a multiple of it). Each
step's dot is added into an fp32 accumulator: on Hopper, Triton's fp8 dots accumulate with reduced precision
inside the dot (its default there), so promoting to fp32 every 128 products bounds that error, as DeepSeek's FP8
GEMMs do. The FP8 weights are read as they are, never written back dequantised.
Launch order: one 1-D grid, tiles grouped GROUP_M at a time (the 128-row activation tiles of a group are reused
across every N block while they sit in L2, and consecutive groups share an expert's weights); a grid with the
N blocks outermost re-read all activations from memory once per N block.
Tiles are mapped to (expert, first row) on the device (the layer's ``expert_plan``, or ``tile_map_reference``),
from a static upper bound on their number (cdiv(M, BLOCK_M) + E): no host sync, so the launch can sit in a CUDA
graph. Spare tiles exit at once. Block sizes come from ``config_for`` / ``swiglu_config_for``, chosen by an H200
sweep; no autotune.
On CPU (interpreter) the tiles are converted to fp32 before the dot (the interpreter's fp8 maths is wrong).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from indexcache.kernels.expert_plan.reference import tile_map_reference
from indexcache.kernels.fp8_linear.reference import _TINY, FP8_MAX, blocks
from indexcache.kernels.fp8_linear.triton import quantize_groups

BLOCK_K = 128  # one activation group and one weight block per K step
GROUP_M = 8


def config_for(m: int, num_experts: int) -> dict:
    """Block sizes (host shapes only): 64x128 tiles, 4 warps, 4 stages at every size. In an H200 sweep at the MoE
    down projection (8K and 16K tokens x top-4 over 64 experts, benchmarks/moe_prefill.py --sweep) they beat
    128x128 with 8 warps by 5%, and they pad each expert's rows less."""
    return {"block_m": 64, "block_n": 128, "num_warps": 4, "num_stages": 4}


@triton.jit
def _tile_coords(pid, N, NUM_TILES, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(tile, column block) of program ``pid``: GROUP_M row tiles at a time, every column block of a group before
    the next group, so a group's activation tiles are reused from L2."""
    nb = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * nb
    first = (pid // per_group) * GROUP_M
    size = tl.minimum(NUM_TILES - first, GROUP_M)
    return first + (pid % per_group) % size, (pid % per_group) // size


@triton.jit
def _tile_rows(tile_row_ptr, row_end_ptr, a_row_ptr, t, e, BLOCK_M: tl.constexpr, GATHER_A: tl.constexpr):
    """Tile t of expert e: its sorted rows, which of them are the expert's, and the rows of ``a`` they read
    (a_row[rows], the token of each (token, slot) pair, with GATHER_A)."""
    rows = tl.load(tile_row_ptr + t) + tl.arange(0, BLOCK_M)
    rmask = rows < tl.load(row_end_ptr + e)
    if GATHER_A:
        src = tl.load(a_row_ptr + rows, mask=rmask, other=0).to(tl.int64)
    else:
        src = rows.to(tl.int64)
    return rows, rmask, src


@triton.jit
def _dot(a, w, DOT_F32: tl.constexpr):
    if DOT_F32:  # the interpreter's fp8 maths is wrong: exact fp8 values in fp32
        return tl.dot(a.to(tl.float32), w.to(tl.float32), input_precision="ieee")
    return tl.dot(a, w)


# the tile count and the activation scales' column stride (M) vary with the batch: one compile per weight shape
@triton.jit(do_not_specialize=["NUM_TILES", "stride_sak"])
def _grouped_fp8_kernel(a_ptr, sa_ptr, a_row_ptr, w_ptr, s_ptr, out_ptr, out_row_ptr, row_w_ptr,
                        tile_e_ptr, tile_row_ptr, row_end_ptr, N, K, E, NUM_TILES,
                        stride_am, stride_ak, stride_sam, stride_sak, stride_we, stride_wn, stride_wk,
                        stride_se, stride_sn, stride_sk, stride_om, stride_on,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                        GATHER_A: tl.constexpr, SCATTER_OUT: tl.constexpr, DOT_F32: tl.constexpr):
    """GATHER_A: sorted row r reads a[a_row[r]]. SCATTER_OUT: row r is multiplied by row_w[r] and stored at
    out[out_row[r]] (the MoE down projection writes each (token, slot) pair weighted, in pair order)."""
    t, pn = _tile_coords(tl.program_id(0), N, NUM_TILES, BLOCK_N, GROUP_M)
    e = tl.load(tile_e_ptr + t)
    if e < E:
        e64 = e.to(tl.int64)
        rows, rmask, src = _tile_rows(tile_row_ptr, row_end_ptr, a_row_ptr, t, e, BLOCK_M, GATHER_A)
        cols = pn * BLOCK_N + tl.arange(0, BLOCK_N)
        cmask = cols < N
        a_rows = a_ptr + src[:, None] * stride_am
        sa_rows = sa_ptr + src * stride_sam
        w_cols = w_ptr + e64 * stride_we + cols.to(tl.int64)[None, :] * stride_wn
        s_cols = s_ptr + e64 * stride_se + (cols // 128) * stride_sn  # one weight block row per 128 columns
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            kmask = ks < K
            a = tl.load(a_rows + ks[None, :] * stride_ak, mask=rmask[:, None] & kmask[None, :], other=0.0)
            w = tl.load(w_cols + ks[:, None] * stride_wk, mask=kmask[:, None] & cmask[None, :], other=0.0)
            s = tl.load(s_cols + (k0 // 128) * stride_sk, mask=cmask, other=0.0)
            sa = tl.load(sa_rows + (k0 // 128) * stride_sak, mask=rmask, other=0.0)
            acc += _dot(a, w, DOT_F32) * (sa[:, None] * s[None, :])
        if SCATTER_OUT:
            dst = tl.load(out_row_ptr + rows, mask=rmask, other=0).to(tl.int64)
            acc = acc * tl.load(row_w_ptr + rows, mask=rmask, other=0.0)[:, None]
        else:
            dst = rows.to(tl.int64)
        tl.store(out_ptr + dst[:, None] * stride_om + cols[None, :] * stride_on,
                 acc.to(out_ptr.dtype.element_ty), mask=rmask[:, None] & cmask[None, :])


@triton.jit(do_not_specialize=["NUM_TILES", "stride_sak"])
def _grouped_fp8_swiglu_kernel(a_ptr, sa_ptr, a_row_ptr, w_ptr, s_ptr, h_ptr, sh_ptr,
                               tile_e_ptr, tile_row_ptr, row_end_ptr, I, IB, K, E, NUM_TILES,
                               stride_am, stride_ak, stride_sam, stride_sak, stride_we, stride_wn, stride_wk,
                               stride_se, stride_sn, stride_sk, stride_hm, stride_shm, stride_shb,
                               BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                               GATHER_A: tl.constexpr, DOT_F32: tl.constexpr, TINY: tl.constexpr,
                               QMAX: tl.constexpr):
    """One 128-column block j of h = silu(x W_gate^T) * (x W_up^T) for BLOCK_M sorted rows: gate's rows
    j*128.. and up's rows I + j*128.. of the stacked [2I, K] weight (their scale rows j and IB + j), two fp32
    accumulators over one activation tile per K step. The block is exactly one 1x128 group of h, so the epilogue
    quantises it for the down projection (as ``quantize_act``: div_rn scale, e4m3 rounding) and h never reaches
    memory in bf16."""
    t, pn = _tile_coords(tl.program_id(0), I, NUM_TILES, 128, GROUP_M)
    e = tl.load(tile_e_ptr + t)
    if e < E:
        e64 = e.to(tl.int64)
        rows, rmask, src = _tile_rows(tile_row_ptr, row_end_ptr, a_row_ptr, t, e, BLOCK_M, GATHER_A)
        cols = pn * 128 + tl.arange(0, 128)
        cmask = cols < I
        a_rows = a_ptr + src[:, None] * stride_am
        sa_rows = sa_ptr + src * stride_sam
        g_cols = w_ptr + e64 * stride_we + cols.to(tl.int64)[None, :] * stride_wn
        u_cols = g_cols + I.to(tl.int64) * stride_wn
        sg_base = s_ptr + e64 * stride_se + pn * stride_sn
        su_base = sg_base + IB * stride_sn
        acc_g = tl.zeros([BLOCK_M, 128], tl.float32)
        acc_u = tl.zeros([BLOCK_M, 128], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            kmask = ks < K
            wmask = kmask[:, None] & cmask[None, :]
            a = tl.load(a_rows + ks[None, :] * stride_ak, mask=rmask[:, None] & kmask[None, :], other=0.0)
            wg = tl.load(g_cols + ks[:, None] * stride_wk, mask=wmask, other=0.0)
            wu = tl.load(u_cols + ks[:, None] * stride_wk, mask=wmask, other=0.0)
            sa = tl.load(sa_rows + (k0 // 128) * stride_sak, mask=rmask, other=0.0)
            sg = tl.load(sg_base + (k0 // 128) * stride_sk)
            su = tl.load(su_base + (k0 // 128) * stride_sk)
            acc_g += _dot(a, wg, DOT_F32) * (sa[:, None] * sg)
            acc_u += _dot(a, wu, DOT_F32) * (sa[:, None] * su)
        h = acc_g * tl.sigmoid(acc_g) * acc_u  # masked columns: 0 * 0
        q, scale = quantize_groups(h, TINY, QMAX)
        rows64 = rows.to(tl.int64)
        tl.store(h_ptr + rows64[:, None] * stride_hm + cols[None, :], q.to(h_ptr.dtype.element_ty),
                 mask=rmask[:, None] & cmask[None, :])
        tl.store(sh_ptr + rows64 * stride_shm + pn * stride_shb, scale, mask=rmask)


def _tiles(plan, counts, m, block_m):
    """(tile expert, tile row, expert end) for this block size: from the layer's routing plan when it holds this
    block size's map, else computed here with torch ops."""
    if plan is not None and block_m in plan.tiles:
        return (*plan.tiles[block_m], plan.expert_end)
    return (*tile_map_reference(counts, m, block_m), counts.cumsum(0).to(torch.int32))


def fp8_grouped_mm_triton(a, counts, w, scale_inv, a_scale, *, out=None, out_dtype=torch.bfloat16, config=None,
                          a_rows=None, out_rows=None, row_weight=None, plan=None):
    """Inputs already checked: a fp8 [Ma, K] with ``a_scale`` fp32 [Ma, ceil(K/128)] (any strides); M sorted rows
    (M = len(a_rows) when ``a_rows`` gathers them, else Ma). ``out`` [M, N] optional (tests pass a NaN-filled
    one). ``out_rows``/``row_weight``: sorted row r is stored weighted at out[out_rows[r]]. ``plan``: the layer's
    ``expert_plan`` (its tile map for this block size, if it has one, saves the torch ops). ``config``: block
    sizes (default ``config_for``; block_n divides 128 or is a multiple of it)."""
    m = a.shape[0] if a_rows is None else a_rows.shape[0]
    k = a.shape[1]
    E, n, _ = w.shape
    if out is None:
        out = torch.empty(m, n, dtype=out_dtype, device=a.device)
    if m == 0:
        return out
    cfg = dict(config or config_for(m, E))
    block_m, block_n = cfg.pop("block_m"), cfg.pop("block_n")
    if 128 % block_n and block_n % 128:
        raise ValueError(f"fp8_grouped_mm: block_n must divide 128 or be a multiple of it, got {block_n}")
    te, row, ends = _tiles(plan, counts, m, block_m)
    grid = (te.shape[0] * triton.cdiv(n, block_n),)
    _grouped_fp8_kernel[grid](a, a_scale, a if a_rows is None else a_rows, w, scale_inv, out,
                              out if out_rows is None else out_rows, out if row_weight is None else row_weight,
                              te, row, ends, n, k, E, te.shape[0],
                              a.stride(0), a.stride(1), *a_scale.stride(), *w.stride(), *scale_inv.stride(),
                              out.stride(0), out.stride(1),
                              BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=BLOCK_K, GROUP_M=GROUP_M,
                              GATHER_A=a_rows is not None, SCATTER_OUT=out_rows is not None,
                              DOT_F32=not a.is_cuda, **cfg)
    return out


def swiglu_config_for(m: int, num_experts: int) -> dict:
    """Block sizes of the fused gate/up kernel (its tile is two 128-column accumulators: 3 pipeline stages of
    48 KB fp8 operands). H200 sweep (benchmarks/moe_prefill.py --sweep, 8K and 16K tokens): 128 rows with 8 warps
    0.82 / 1.42 ms, 64 rows with 8 warps 0.97 / 1.69, 64 rows with 4 warps 1.25 / 2.34. Few rows per expert keep
    64-row tiles (less padding)."""
    if m <= 64 * num_experts:
        return {"block_m": 64, "num_warps": 8, "num_stages": 3}
    return {"block_m": 128, "num_warps": 8, "num_stages": 3}


def plan_block_sizes(m: int, num_experts: int) -> tuple[int, int]:
    """The row-tile sizes of the gate/up and the down kernels for m sorted rows: the tile maps a routing plan
    should hold."""
    return swiglu_config_for(m, num_experts)["block_m"], config_for(m, num_experts)["block_m"]


def fp8_grouped_swiglu_triton(a, counts, w, scale_inv, a_scale, inter, *, a_rows=None, out=None, config=None,
                              plan=None):
    """Inputs already checked (see ``fp8_grouped_swiglu``) -> (h fp8 [M, inter], h_scale fp32 [M, ceil(inter/128)]).
    ``out``: optional (h, h_scale) destinations (tests pass poisoned ones)."""
    m = a.shape[0] if a_rows is None else a_rows.shape[0]
    k = a.shape[1]
    E = w.shape[0]
    ib = blocks(inter)
    h, sh = out if out is not None else (torch.empty(m, inter, dtype=torch.float8_e4m3fn, device=a.device),
                                         torch.empty(m, ib, dtype=torch.float32, device=a.device))
    if m == 0:
        return h, sh
    cfg = dict(config or swiglu_config_for(m, E))
    block_m = cfg.pop("block_m")
    te, row, ends = _tiles(plan, counts, m, block_m)
    grid = (te.shape[0] * ib,)
    _grouped_fp8_swiglu_kernel[grid](a, a_scale, a if a_rows is None else a_rows, w, scale_inv, h, sh, te, row, ends,
                                     inter, ib, k, E, te.shape[0],
                                     a.stride(0), a.stride(1), *a_scale.stride(), *w.stride(), *scale_inv.stride(),
                                     h.stride(0), *sh.stride(),
                                     BLOCK_M=block_m, BLOCK_K=BLOCK_K, GROUP_M=GROUP_M, GATHER_A=a_rows is not None,
                                     DOT_F32=not a.is_cuda, TINY=_TINY, QMAX=FP8_MAX, **cfg)
    return h, sh
