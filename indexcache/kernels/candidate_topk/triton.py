"""Triton kernel for re-rank scoring: logits of per-query candidate pools over the paged FP8 indexer-key cache.

One program owns one query row and a span of its candidates (the whole pool when there are enough rows to fill
the GPU; decode-sized batches split the pool over programs). It loads the row's q [H,128] e4m3 and w once, then
walks the span in blocks of BC candidates, software-pipelined (``num_stages``: the slot ids of a later block and
the gather of its keys are in flight while the current block is multiplied):
    acc[BC, HP] = k_fp8[cand] @ q_fp8^T  ->  relu -> * w -> sum over heads -> * k_scale
(-inf where the slot id is -1), keys and fp32 scales gathered from the 132-B/token paged layout
(``kernels.formats``). The heads are the MMA's N dimension, the candidates its M.

``candidate_topk_triton`` also selects each row's top-k: with rows enough to fill the GPU, one program per row
scores its whole pool into a scratch row and then selects from it in the same launch (``_select_row``: the row
held whole in registers, a radix select on the float bits, ties to the earlier pool entry); decode-sized batches
score with the pool split over programs, then select with one program per row.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from indexcache.kernels import formats as F
from indexcache.kernels._dispatch import interpreting

_PAGE: tl.constexpr = tl.constexpr(F.PAGE)
_PAGE_BYTES: tl.constexpr = tl.constexpr(F.INDEX_PAGE_BYTES)
_SCALES_AT: tl.constexpr = tl.constexpr(F.INDEX_SCALES_AT)
_D: tl.constexpr = tl.constexpr(F.INDEX_DIM)
_PROGRAMS_PER_SM = 4  # decode-sized batches: split each pool so that rows x parts fill the GPU this many times


@triton.jit
def _score_span(q_ptr, w_ptr, kc8_ptr, kcs_ptr, row_cand, row_out, t, c_lo, c_hi,
                H: tl.constexpr, HP: tl.constexpr, BC: tl.constexpr, STAGES: tl.constexpr):
    """Logits of candidates [c_lo, c_hi) of row t into row_out (-inf where the slot id is -1)."""
    D: tl.constexpr = _D
    offs_h = tl.arange(0, HP)
    offs_d = tl.arange(0, D)
    hmask = offs_h < H
    q = tl.load(q_ptr + (t * H + offs_h[:, None]) * D + offs_d[None, :], mask=hmask[:, None], other=0.0)
    qt = tl.trans(q)  # [D, HP]: K-major B operand
    w = tl.load(w_ptr + t * H + offs_h, mask=hmask, other=0.0)
    for c0 in tl.range(c_lo, c_hi, BC, num_stages=STAGES):
        offs_c = c0 + tl.arange(0, BC)
        cmask = offs_c < c_hi
        slot = tl.load(row_cand + offs_c, mask=cmask, other=-1).to(tl.int64)
        valid = slot >= 0
        s = tl.where(valid, slot, 0)
        base = (s // _PAGE) * _PAGE_BYTES
        off = s % _PAGE
        # unmasked gathers (a -1 reads slot 0, a real slot): a masked gather here trips Triton 3.7's layout
        # pass on sm_90; the -1 entries are set to -inf below
        k = tl.load(kc8_ptr + (base + off * D)[:, None] + offs_d[None, :])
        ks = tl.load(kcs_ptr + (base // 4 + _SCALES_AT // 4 + off))
        acc = tl.dot(k, qt)  # [BC, HP] fp32
        lg = tl.sum(tl.maximum(acc, 0.0) * w[None, :], axis=1) * ks
        tl.store(row_out + offs_c, tl.where(valid, lg, float("-inf")), mask=cmask)


@triton.jit(do_not_specialize=["C", "SPAN"])
def _candidate_logits_kernel(q_ptr, w_ptr, kc8_ptr, kcs_ptr, cand_ptr, out_ptr, C, SPAN,
                             H: tl.constexpr, HP: tl.constexpr, BC: tl.constexpr, STAGES: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    c_lo = tl.program_id(1) * SPAN
    c_hi = tl.minimum(c_lo + SPAN, C)
    _score_span(q_ptr, w_ptr, kc8_ptr, kcs_ptr, cand_ptr + t * C, out_ptr + t * C, t, c_lo, c_hi,
                H=H, HP=HP, BC=BC, STAGES=STAGES)


@triton.jit
def _select_row(lg_row, cand_row, out_row, C, K, CP: tl.constexpr):
    """The exact top-K of a row of C logits (held whole, as one [CP] tensor): out_row[:K] = the slot ids of the
    selected entries in pool order, then -1. Radix select on order-preserving uint32 keys (-inf and NaN map to
    0, never selected): the K-th largest key is found bit by bit from the top (32 count passes); every key above
    it is taken, and of the keys equal to it the first ones in pool order (a cumsum), as many as are missing."""
    offs = tl.arange(0, CP)
    x = tl.load(lg_row + offs, mask=offs < C, other=float("-inf"))
    bits = x.to(tl.uint32, bitcast=True)
    key = tl.where((bits >> 31) != 0, bits ^ 0xFFFFFFFF, bits | 0x80000000)
    key = tl.where(x == 0, 0x80000000, key)  # -0.0 ties with +0.0
    key = tl.where((x == x) & (x != float("-inf")), key, 0)  # valid keys are > 0x007FFFFF
    kth = tl.full([], 0, tl.uint32)
    for i in tl.static_range(32):
        trial = kth | (1 << (31 - i))
        n = tl.sum((key >= trial).to(tl.int32), axis=0)
        kth = tl.where(n >= K, trial, kth)
    # fewer than K valid: kth stays 0, every valid key is above it, no tie is taken
    above = key > kth
    tie = (key == kth) & (key != 0)
    missing = K - tl.sum(above.to(tl.int32), axis=0)
    take = above | (tie & (tl.cumsum(tie.to(tl.int32), axis=0) <= missing))
    pos = tl.cumsum(take.to(tl.int32), axis=0) - 1
    ids = tl.load(cand_row + offs, mask=take, other=-1)
    tl.store(out_row + pos, ids, mask=take)
    n_sel = tl.sum(take.to(tl.int32), axis=0)
    for p0 in range(0, K, CP):  # -1 after the selected entries
        p = p0 + offs
        tl.store(out_row + p, -1, mask=(p >= n_sel) & (p < K))


@triton.jit(do_not_specialize=["C", "K"])
def _candidate_topk_kernel(q_ptr, w_ptr, kc8_ptr, kcs_ptr, cand_ptr, lg_ptr, out_ptr, C, K,
                           H: tl.constexpr, HP: tl.constexpr, BC: tl.constexpr, STAGES: tl.constexpr,
                           CP: tl.constexpr):
    """Score row t's whole pool into its scratch row (written and read back at once: L2-resident), then select."""
    t = tl.program_id(0).to(tl.int64)
    _score_span(q_ptr, w_ptr, kc8_ptr, kcs_ptr, cand_ptr + t * C, lg_ptr + t * C, t, 0, C,
                H=H, HP=HP, BC=BC, STAGES=STAGES)
    tl.debug_barrier()  # the row's logits were stored by other threads of this program
    _select_row(lg_ptr + t * C, cand_ptr + t * C, out_ptr + t * K, C, K, CP=CP)


@triton.jit(do_not_specialize=["C", "K"])
def _select_topk_kernel(lg_ptr, cand_ptr, out_ptr, C, K, CP: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    _select_row(lg_ptr + t * C, cand_ptr + t * C, out_ptr + t * K, C, K, CP=CP)


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def candidate_config() -> dict:
    """BC candidates per block, warps, pipeline stages (num_stages of the candidate loop)."""
    if interpreting():
        return dict(BC=32, num_warps=4, num_stages=1)
    return dict(BC=128, num_warps=4, num_stages=3)


def candidate_span(t: int, c: int, bc: int, sms: int) -> int:
    """Candidates per program: the whole pool (rounded up to blocks) when there are rows enough for
    ``_PROGRAMS_PER_SM`` programs per SM, else the pool split into equal block-aligned spans."""
    blocks = triton.cdiv(max(c, 1), bc)
    parts = max(1, min(blocks, triton.cdiv(_PROGRAMS_PER_SM * sms, max(t, 1))))
    return triton.cdiv(blocks, parts) * bc


def candidate_logits_triton(q_fp8, w, kv_cache, cand, *, out=None, config=None):
    t, h, _ = q_fp8.shape
    c = cand.shape[1]
    cfg = dict(candidate_config(), **(config or {}))
    if out is None:
        out = torch.empty(t, c, device=q_fp8.device, dtype=torch.float32)
    if t == 0 or c == 0:
        return out
    sms = torch.cuda.get_device_properties(q_fp8.device).multi_processor_count if q_fp8.is_cuda else 1
    span = cfg.get("span") or candidate_span(t, c, cfg["BC"], sms)
    grid = (t, triton.cdiv(c, span))
    _candidate_logits_kernel[grid](
        q_fp8.contiguous(), w.contiguous(), kv_cache.view(torch.float8_e4m3fn), kv_cache.view(torch.float32),
        cand.contiguous(), out, c, span, H=h, HP=max(16, _pow2(h)), BC=cfg["BC"], STAGES=cfg["num_stages"],
        num_warps=cfg["num_warps"])
    return out


MAX_SELECT_POOL = 16384  # the selection holds a row in registers: pools up to this many candidates


def select_warps(cp: int) -> int:
    """Warps of a selecting program: the row's keys spread at most 32 a thread."""
    return 4 if interpreting() else max(4, min(16, cp // (32 * 32)))


def fused_warps(cp: int) -> int:
    """Warps of the fused score-and-select program (the scoring is tuned at 4; pools past 8192 need more
    threads to hold the row)."""
    return 4 if interpreting() or cp <= 8192 else 8


def candidate_topk_triton(q_fp8, w, kv_cache, cand, k: int, *, out=None, config=None):
    """[T,k] int32 slot ids of each row's top-k candidates. Rows enough to fill the GPU with one program per row:
    one launch that scores and selects; decode-sized batches: the pool split over programs for the scoring
    (``candidate_logits_triton``), then one selecting program per row (``select_topk_triton``)."""
    t, h, _ = q_fp8.shape
    c = cand.shape[1]
    if out is None:
        out = torch.empty(t, k, device=q_fp8.device, dtype=torch.int32)
    if t == 0 or k == 0:
        return out
    if c == 0:
        return out.fill_(-1)
    cp = _pow2(c)
    if cp > MAX_SELECT_POOL:
        raise ValueError(f"candidate_topk_triton: pools of at most {MAX_SELECT_POOL} candidates, got {c}")
    cfg = dict(candidate_config(), **(config or {}))
    sms = torch.cuda.get_device_properties(q_fp8.device).multi_processor_count if q_fp8.is_cuda else 1
    span = cfg.get("span") or candidate_span(t, c, cfg["BC"], sms)
    if span >= c:
        lg = torch.empty(t, c, device=q_fp8.device, dtype=torch.float32)  # scratch, read back at once
        _candidate_topk_kernel[(t,)](
            q_fp8.contiguous(), w.contiguous(), kv_cache.view(torch.float8_e4m3fn), kv_cache.view(torch.float32),
            cand.contiguous(), lg, out, c, k, H=h, HP=max(16, _pow2(h)), BC=cfg["BC"], STAGES=cfg["num_stages"],
            CP=cp, num_warps=cfg.get("fused_warps", fused_warps(cp)))
        return out
    lg = candidate_logits_triton(q_fp8, w, kv_cache, cand, config=dict(cfg, span=span))
    return select_topk_triton(lg, cand, k, out=out)


def select_topk_triton(logits, cand, k: int, *, out=None):
    """[T,k] int32: the slot ids cand[t, j] of each row's k largest logits[t, j] (fp32 [T,c], -inf / NaN never
    selected), in pool order, then -1; ties go to the earlier pool entry."""
    t, c = logits.shape
    if c > MAX_SELECT_POOL:
        raise ValueError(f"select_topk_triton: rows of at most {MAX_SELECT_POOL} entries, got {c}")
    if out is None:
        out = torch.empty(t, k, device=logits.device, dtype=torch.int32)
    if t == 0 or k == 0:
        return out
    if c == 0:
        return out.fill_(-1)
    cp = _pow2(c)
    _select_topk_kernel[(t,)](logits.contiguous(), cand.contiguous(), out, c, k, CP=cp, num_warps=select_warps(cp))
    return out
