"""Triton per-token 1x128 activation quantisation, written straight into the layout scaled_mm reads.

One pass over x [M, K]: each program loads a [BLOCK_R, 128] tile (BLOCK_R rows, one 128-channel group), takes
each row's amax, and writes the e4m3 values q [Mp, K] and the fp32 scales into scale [Mp, ceil(K/128)] with
strides (1, Mp) (column-major: scaled_mm's scale_a layout, and coalesced here, as a tile's rows are adjacent in
it). Rows M..Mp-1 (padding to a multiple of 4 for scaled_mm) are written as zeros with the all-zero scale, so no
F.pad, transpose or copy runs around it. A ragged K (a partial last group) is masked.
The values equal ``quantize_act_reference``'s bit for bit: scale = max(amax, 1e-12) / 448 and q = x / scale
both use round-to-nearest division (``div_rn``: Triton's plain fp32 ``/`` is approximate on the GPU), and q is
rounded to e4m3's grid (nearest, ties to even, as torch's cast) in fp32 before the cast, which is then exact (the
interpreter's own fp32 -> fp8 cast mis-rounds values just below a power of two).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from indexcache.kernels.arrival import arrival_counters, arrive_last
from indexcache.kernels.fp8_linear.reference import BLOCK, FP8, FP8_MAX, _TINY, blocks

BLOCK_R = 32  # rows per program: 32 x 128 values per tile, a few KB in flight per program (memory-bound)


@triton.jit
def _round_to_e4m3(v):
    """v (|v| <= 448, fp32) rounded to nearest-even on e4m3's grid, in fp32: the step is 2^(e - 3) for a binary
    exponent e >= -6 and 2^-9 below (subnormals); the sign is kept (-0 stays -0, as in torch's cast). The cast
    to fp8 after it is then exact."""
    bits = v.to(tl.int32, bitcast=True)
    e = tl.maximum(((bits >> 23) & 0xFF) - 127, -6) - 3
    step = ((e + 127) << 23).to(tl.float32, bitcast=True)
    r = tl.abs(v) * ((127 - e) << 23).to(tl.float32, bitcast=True)  # times 1 / step (powers of two: exact), < 16
    r = (r + 12582912.0) - 12582912.0  # 1.5 * 2^23: fp32 addition rounds r to an integer, ties to even
    r = (r * step).to(tl.int32, bitcast=True) | (bits & -2147483648)
    return r.to(tl.float32, bitcast=True)


@triton.jit
def quantize_groups(x, TINY: tl.constexpr, QMAX: tl.constexpr):
    """x fp32 [rows, group] -> (values on e4m3's grid in fp32, scale [rows]) as ``quantize_act_reference``:
    scale = max(amax, TINY) / QMAX and x / scale, both correctly rounded (div_rn), clamped, rounded to e4m3."""
    amax = tl.maximum(tl.max(tl.abs(x), axis=1), TINY)
    scale = tl.math.div_rn(amax, tl.zeros_like(amax) + QMAX)
    q = tl.math.div_rn(x, scale[:, None])
    return _round_to_e4m3(tl.minimum(tl.maximum(q, -QMAX), QMAX)), scale


@triton.jit(do_not_specialize=["M", "MP", "stride_sk"])  # row counts vary per batch: one compile
def _act_quant_kernel(x_ptr, q_ptr, s_ptr, M, MP, K, stride_xm, stride_xk, stride_qm, stride_sm, stride_sk,
                      TINY: tl.constexpr, QMAX: tl.constexpr, BLOCK_R: tl.constexpr, GROUP: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    grp = tl.program_id(1)
    cols = grp * GROUP + tl.arange(0, GROUP)
    kmask = cols < K
    rows64 = rows.to(tl.int64)
    x = tl.load(x_ptr + rows64[:, None] * stride_xm + cols[None, :] * stride_xk,
                mask=(rows < M)[:, None] & kmask[None, :], other=0.0).to(tl.float32)
    q, scale = quantize_groups(x, TINY, QMAX)
    # rows M..Mp-1 get zeros and the all-zero group's scale
    live = rows < MP
    tl.store(q_ptr + rows64[:, None] * stride_qm + cols[None, :], q.to(q_ptr.dtype.element_ty),
             mask=live[:, None] & kmask[None, :])
    tl.store(s_ptr + rows64 * stride_sm + grp * stride_sk, scale, mask=live)


def quantize_act_triton(x: torch.Tensor, pad_rows_to: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] float32/float16/bfloat16 (any strides) -> (q fp8 e4m3 [Mp, K], scale fp32 [Mp, ceil(K/128)]
    with strides (1, Mp)), Mp = M rounded up to ``pad_rows_to``; padding rows are zero."""
    if x.dim() != 2 or x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"quantize_act: x must be [M, K] float32/float16/bfloat16, got {tuple(x.shape)} {x.dtype}")
    if pad_rows_to < 1:
        raise ValueError(f"quantize_act: pad_rows_to must be >= 1, got {pad_rows_to}")
    m, k = x.shape
    mp = -(-m // pad_rows_to) * pad_rows_to
    kb = blocks(k)
    q = torch.empty(mp, k, dtype=FP8, device=x.device)
    scale = torch.empty_strided((mp, kb), (1, mp), dtype=torch.float32, device=x.device)
    if mp == 0 or k == 0:
        return q, scale
    grid = (triton.cdiv(mp, BLOCK_R), kb)
    _act_quant_kernel[grid](x, q, scale, m, mp, k, x.stride(0), x.stride(1), q.stride(0), *scale.stride(),
                            TINY=_TINY, QMAX=FP8_MAX, BLOCK_R=BLOCK_R, GROUP=BLOCK, num_warps=4)
    return q, scale


# ---- weight-only (W8A16) small-M GEMM: y[M, N] = x[M, K] @ dequant(w fp8 [N, K])^T, no activation quantisation ----
GEMV_BLOCK_M = 16  # tl.dot's smallest M: rows M..15 are masked (zeros in, never stored)
GEMV_BLOCK_N = 64  # divides 128, so a program's columns share one weight block row and one scale per K step


@triton.jit
def _fp8_gemv_kernel(x_ptr, w_ptr, s_ptr, part_ptr, out_ptr, cnt_ptr, M, N, K, KB, KB_PER_SPLIT, SPLITS,
                     stride_xm, stride_xk, stride_wn, stride_sn, stride_sk, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr, GROUP: tl.constexpr, PRECISION: tl.constexpr):
    """Program (n tile, K split): acc[BLOCK_M, BLOCK_N] = sum over its 128-wide K blocks of
    (x tile @ fp8 tile^T) * scale, fp32 accumulation. The fp8 values convert exactly to x's dtype (e4m3 fits
    fp16, bf16 and fp32), so the tile product is x's GEMM on the stored codes and the block scale multiplies
    the fp32 partial sum once per block.
    With SPLITS > 1 each program stores its fp32 partial in part [SPLITS, M, N] and counts itself in on its
    tile's arrival counter; the last to arrive sums the tile's partials in split order (the result does not
    depend on which program is last) and writes the output. One launch instead of a second, summing kernel."""
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    rows = tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, GROUP)
    rmask = rows < M
    nmask = cols < N
    cols64 = cols.to(tl.int64)
    sb_row = (pid_n * BLOCK_N) // GROUP
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    kb0 = split * KB_PER_SPLIT
    kb1 = tl.minimum(kb0 + KB_PER_SPLIT, KB)
    for kb in range(kb0, kb1):
        kk = kb * GROUP + ks
        kmask = kk < K
        x = tl.load(x_ptr + rows[:, None] * stride_xm + kk[None, :] * stride_xk,
                    mask=rmask[:, None] & kmask[None, :], other=0.0)
        w = tl.load(w_ptr + cols64[:, None] * stride_wn + kk[None, :], mask=nmask[:, None] & kmask[None, :],
                    other=0.0)
        part = tl.dot(x, tl.trans(w.to(x.dtype)), input_precision=PRECISION)
        acc += part * tl.load(s_ptr + sb_row * stride_sn + kb * stride_sk)
    offs = rows[:, None] * N + cols[None, :]
    omask = rmask[:, None] & nmask[None, :]
    if SPLITS == 1:
        tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=omask)
    else:
        mn = M * N
        tl.store(part_ptr + split * mn + offs, acc, mask=omask)
        if arrive_last(cnt_ptr + pid_n, SPLITS):
            tot = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            for s in range(SPLITS):  # .cg: other SMs wrote these, read them from L2, not a stale L1
                tot += tl.load(part_ptr + s * mn + offs, mask=omask, other=0.0, cache_modifier=".cg")
            tl.store(out_ptr + offs, tot.to(out_ptr.dtype.element_ty), mask=omask)


def _programs_wanted(device: torch.device) -> int:
    """Two programs per SM keep enough fp8 tiles in flight to stream the weight at copy bandwidth; the CPU
    interpreter gets a small number, so tests exercise split-K."""
    if device.type != "cuda":
        return 8
    return 2 * _sm_count(device.index if device.index is not None else torch.cuda.current_device())


@torch.compiler.assume_constant_result
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def split_k_for(n: int, k: int, device: torch.device) -> int:
    """K splits so that (N tiles) x (splits) reaches the programs wanted; every split owns >= one 128 block."""
    tiles = triton.cdiv(n, GEMV_BLOCK_N)
    kb = blocks(k)
    split = max(1, min(kb, triton.cdiv(_programs_wanted(device), tiles)))
    per = triton.cdiv(kb, split)
    return triton.cdiv(kb, per)  # no empty split


def fp8_gemv_triton(x: torch.Tensor, w: torch.Tensor, scale_inv: torch.Tensor,
                    split_k: int | None = None) -> torch.Tensor:
    """x [M, K] float32/float16/bfloat16 (M <= 16, any strides) @ dequant(w fp8 e4m3 [N, K] row-major,
    scale_inv fp32 [ceil(N/128), ceil(K/128)])^T -> [M, N] in x's dtype, fp32 accumulation, x not quantised.
    Any N and K (partial last blocks are masked). ``split_k``: K splits (default: enough programs for the
    device); above 1 the last program of each N tile sums the fp32 partial sums (see the kernel)."""
    if x.dim() != 2 or x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"fp8_gemv: x must be [M, K] float32/float16/bfloat16, got {tuple(x.shape)} {x.dtype}")
    m, k = x.shape
    if m > GEMV_BLOCK_M:
        raise ValueError(f"fp8_gemv: at most {GEMV_BLOCK_M} rows, got M={m}")
    if w.dtype != FP8 or w.dim() != 2 or w.shape[1] != k:
        raise ValueError(f"fp8_gemv: weight must be float8_e4m3fn [N, {k}], got {tuple(w.shape)} {w.dtype}")
    if w.stride(1) != 1:
        raise ValueError(f"fp8_gemv: weight rows must be contiguous, got strides {w.stride()}")
    n = w.shape[0]
    if tuple(scale_inv.shape) != (blocks(n), blocks(k)):
        raise ValueError(f"fp8_gemv: scale_inv shape {tuple(scale_inv.shape)} does not fit weight {tuple(w.shape)}")
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return out
    if k == 0:
        return out.zero_()
    s = scale_inv if scale_inv.dtype == torch.float32 else scale_inv.float()
    kb = blocks(k)
    split = split_k_for(n, k, x.device) if split_k is None else split_k
    if not 1 <= split <= kb:
        raise ValueError(f"fp8_gemv: split_k must be in [1, {kb}] for K={k}, got {split}")
    per = triton.cdiv(kb, split)
    split = triton.cdiv(kb, per)
    part = out if split == 1 else torch.empty(split, m, n, dtype=torch.float32, device=x.device)
    tiles = triton.cdiv(n, GEMV_BLOCK_N)
    cnt = arrival_counters(x.device, tiles)
    _fp8_gemv_kernel[(tiles, split)](x, w, s, part, out, cnt, m, n, k, kb, per, split, x.stride(0), x.stride(1),
                                     w.stride(0), s.stride(0), s.stride(1), BLOCK_M=GEMV_BLOCK_M,
                                     BLOCK_N=GEMV_BLOCK_N, GROUP=BLOCK,
                                     PRECISION="ieee" if x.dtype == torch.float32 else "tf32", num_warps=4,
                                     num_stages=4)
    return out
