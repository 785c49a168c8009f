"""Triton kernels for the routed experts at decode batch sizes (a few (token, slot) pairs).

Here the experts are a handful of matrix-vector products, so the time is reading the active experts' weights
(~19 MB each at D=2048, I=1536 in bf16); tensor cores do not help. Two launches, deterministic:
  1. gate/up, grid (N*K, cdiv(I, BLOCK_I)): act[nk, i] = silu(gate_e[i] . x[n]) * (up_e[i] . x[n])   (fp32)
  2. down,    grid (N*K, cdiv(D, BLOCK_D2)): part[nk, d] = weights[nk] * (down_e[d] . act[nk])      (fp32)
     and the last of a token's K programs on a row block (arrival counters) sums the token's K parts in slot
     order into y [N, D] in x's dtype: the combine needs no third launch and the same inputs give the same bits.
Each program multiplies a [rows, cols] tile of one expert's matrix by a vector with an fp32 [rows, cols]
accumulator, summed over cols once after the loop (no per-iteration cross-warp reduction between the loads). Grid axis 0 (the pair) varies fastest, so pairs that share an expert
read the same weight rows at about the same time and the repeats mostly hit L2.
Values are converted to fp32 right after loading (also what the interpreter needs: its bf16 math is wrong).
No host syncs: shapes only, so the launches can be captured in a CUDA graph. The down row block (32) is the best
of a sweep on an H200 (benchmarks/decode_kernels.py); gate/up's 16 x 256 is its best at one token (32 rows
were 4% faster at eight).
FP8 experts (HAS_SCALE): each loaded weight tile is multiplied by its 128x128 block scales right after the fp32
conversion; a program's rows lie in one 128-row block (the row block sizes divide 128), its columns span a few,
so the scales are one small vector load per iteration. gate and up address their own scale blocks, so I need not
be a multiple of 128.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from indexcache.kernels.arrival import arrival_counters, arrive_last

BLOCK_I, BLOCK_D = 16, 256      # gate/up: rows of I per program, D chunk per iteration
BLOCK_D2, BLOCK_I2 = 32, 512    # down: rows of D per program, I chunk per iteration


@triton.jit
def _gate_up_kernel(x_ptr, ids_ptr, w_ptr, s_ptr, act_ptr, K, D, I, IB,
                    stride_xn, stride_xd, stride_we, stride_wr, stride_wc, stride_se, stride_sr, stride_sc,
                    BLOCK_I: tl.constexpr, BLOCK_D: tl.constexpr, HAS_SCALE: tl.constexpr):
    nk = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    rmask = rows < I
    e = tl.load(ids_ptr + nk).to(tl.int64)
    x_row = x_ptr + (nk // K).to(tl.int64) * stride_xn
    gate = w_ptr + e * stride_we + rows.to(tl.int64)[:, None] * stride_wr  # [BLOCK_I, 1]
    up = gate + I * stride_wr
    s_gate = s_ptr + e * stride_se + (tl.program_id(1) * BLOCK_I // 128) * stride_sr  # this program's row block
    s_up = s_gate + IB * stride_sr
    acc_g = tl.zeros([BLOCK_I, BLOCK_D], tl.float32)
    acc_u = tl.zeros([BLOCK_I, BLOCK_D], tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        cmask = cols < D
        xv = tl.load(x_row + cols * stride_xd, mask=cmask, other=0.0).to(tl.float32)[None, :]
        m = rmask[:, None] & cmask[None, :]
        wg = tl.load(gate + cols[None, :] * stride_wc, mask=m, other=0.0).to(tl.float32)
        wu = tl.load(up + cols[None, :] * stride_wc, mask=m, other=0.0).to(tl.float32)
        if HAS_SCALE:
            sc = (cols // 128) * stride_sc
            wg = wg * tl.load(s_gate + sc, mask=cmask, other=0.0)[None, :]
            wu = wu * tl.load(s_up + sc, mask=cmask, other=0.0)[None, :]
        acc_g += wg * xv
        acc_u += wu * xv
    g = tl.sum(acc_g, axis=1)
    u = tl.sum(acc_u, axis=1)
    act = g / (1.0 + tl.exp(-g)) * u  # silu(g) * u; exp overflow for very negative g gives -0, the right limit
    tl.store(act_ptr + nk.to(tl.int64) * I + rows, act, mask=rmask)


@triton.jit
def _down_kernel(act_ptr, ids_ptr, wt_ptr, w_ptr, s_ptr, part_ptr, y_ptr, cnt_ptr, K, D, I,
                 stride_we, stride_wr, stride_wc, stride_se, stride_sr, stride_sc,
                 BLOCK_D2: tl.constexpr, BLOCK_I2: tl.constexpr, HAS_SCALE: tl.constexpr):
    nk = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_D2 + tl.arange(0, BLOCK_D2)
    rmask = rows < D
    e = tl.load(ids_ptr + nk).to(tl.int64)
    act_row = act_ptr + nk.to(tl.int64) * I
    mat = w_ptr + e * stride_we + rows.to(tl.int64)[:, None] * stride_wr
    s_row = s_ptr + e * stride_se + (tl.program_id(1) * BLOCK_D2 // 128) * stride_sr
    acc = tl.zeros([BLOCK_D2, BLOCK_I2], tl.float32)
    for i0 in range(0, I, BLOCK_I2):
        cols = i0 + tl.arange(0, BLOCK_I2)
        cmask = cols < I
        av = tl.load(act_row + cols, mask=cmask, other=0.0)[None, :]
        m = rmask[:, None] & cmask[None, :]
        w = tl.load(mat + cols[None, :] * stride_wc, mask=m, other=0.0).to(tl.float32)
        if HAS_SCALE:
            w = w * tl.load(s_row + (cols // 128) * stride_sc, mask=cmask, other=0.0)[None, :]
        acc += w * av
    out = tl.sum(acc, axis=1) * tl.load(wt_ptr + nk).to(tl.float32)
    tl.store(part_ptr + nk.to(tl.int64) * D + rows, out, mask=rmask)
    # the token's K pairs meet on one counter per row block; the last sums their parts in slot order
    n = nk // K
    if arrive_last(cnt_ptr + n * tl.num_programs(1) + tl.program_id(1), K):
        y = tl.zeros([BLOCK_D2], tl.float32)
        for j in range(K):
            y += tl.load(part_ptr + (n * K + j).to(tl.int64) * D + rows, mask=rmask, other=0.0,
                         cache_modifier=".cg")
        tl.store(y_ptr + n.to(tl.int64) * D + rows, y.to(y_ptr.dtype.element_ty), mask=rmask)


def moe_experts_small_triton(x, ids, weights, gate_up, down, *, gate_up_scale=None, down_scale=None, act=None,
                             part=None, block_i=BLOCK_I, block_d=BLOCK_D, block_d2=BLOCK_D2, block_i2=BLOCK_I2,
                             gate_up_warps=4, down_warps=4):
    """Inputs already checked (reference.check_moe_inputs). ``act`` fp32 [N*K, I] and ``part`` fp32 [N*K, D] are
    optional scratch buffers (tests pass NaN-filled ones); the block sizes are powers of two (block_i and block_d2
    at most 128: a program's rows must lie in one 128-row scale block)."""
    n, d = x.shape
    k = ids.shape[1]
    inter = gate_up.shape[1] // 2
    nk = n * k
    if nk == 0:
        return torch.zeros_like(x)
    ids = ids.reshape(nk)  # contiguous (a copy only if ids was not): tiny
    wts = weights.reshape(nk)  # any float dtype: the kernel converts (no copy kernel at decode)
    if act is None:
        act = torch.empty(nk, inter, dtype=torch.float32, device=x.device)
    if part is None:
        part = torch.empty(nk, d, dtype=torch.float32, device=x.device)
    has_scale = gate_up_scale is not None
    gs = gate_up_scale if has_scale else wts  # an unused pointer when there are no scales
    ds = down_scale if has_scale else wts
    gss = gate_up_scale.stride() if has_scale else (0, 0, 0)
    dss = down_scale.stride() if has_scale else (0, 0, 0)
    _gate_up_kernel[(nk, triton.cdiv(inter, block_i))](
        x, ids, gate_up, gs, act, k, d, inter, triton.cdiv(inter, 128), x.stride(0), x.stride(1),
        *gate_up.stride(), *gss, BLOCK_I=block_i, BLOCK_D=block_d, HAS_SCALE=has_scale, num_warps=gate_up_warps)
    y = torch.empty(n, d, dtype=x.dtype, device=x.device)
    dblocks = triton.cdiv(d, block_d2)
    _down_kernel[(nk, dblocks)](
        act, ids, wts, down, ds, part, y, arrival_counters(x.device, n * dblocks), k, d, inter, *down.stride(), *dss,
        BLOCK_D2=block_d2, BLOCK_I2=block_i2, HAS_SCALE=has_scale, num_warps=down_warps)
    return y
