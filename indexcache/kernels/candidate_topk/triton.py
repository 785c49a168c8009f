"""Triton kernels for re-rank scoring: logits of per-query candidate pools over the paged FP8 indexer-key cache,
and the top-k of a pool of up to 16384 candidates written as slot ids (``_topk_slots_kernel``, at the end).

One program owns one query row and a span of its candidates (the whole pool when there are enough rows to fill
the GPU; decode-sized batches split the pool over programs). It loads the row's q [H,128] e4m3 and w once, then
walks the span in blocks of BC candidates, software-pipelined (``num_stages``: the slot ids of a later block and
the gather of its keys are in flight while the current block is multiplied):
    acc[BC, HP] = k_fp8[cand] @ q_fp8^T  ->  relu -> * w -> sum over heads -> * k_scale
(-inf where the slot id is -1), keys and fp32 scales gathered from the 132-B/token paged layout
(``kernels.formats``). The heads are the MMA's N dimension, the candidates its M. The top-k of the row is then
taken by ``_topk_slots_kernel`` (or, for wider pools, by ``kernels.topk``).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from indexcache.kernels import formats as F
from indexcache.kernels._dispatch import interpreting
from indexcache.kernels.topk.triton import _keys_of, _narrow

_PAGE: tl.constexpr = tl.constexpr(F.PAGE)
_PAGE_BYTES: tl.constexpr = tl.constexpr(F.INDEX_PAGE_BYTES)
_SCALES_AT: tl.constexpr = tl.constexpr(F.INDEX_SCALES_AT)
_D: tl.constexpr = tl.constexpr(F.INDEX_DIM)
_PROGRAMS_PER_SM = 4  # decode-sized batches: split each pool so that rows x parts fill the GPU this many times


@triton.jit(do_not_specialize=["C", "SPAN"])
def _candidate_logits_kernel(q_ptr, w_ptr, kc8_ptr, kcs_ptr, cand_ptr, out_ptr, C, SPAN,
                             H: tl.constexpr, HP: tl.constexpr, BC: tl.constexpr, STAGES: tl.constexpr):
    D: tl.constexpr = _D
    t = tl.program_id(0).to(tl.int64)
    c_lo = tl.program_id(1) * SPAN
    c_hi = tl.minimum(c_lo + SPAN, C)
    offs_h = tl.arange(0, HP)
    offs_d = tl.arange(0, D)
    hmask = offs_h < H
    q = tl.load(q_ptr + (t * H + offs_h[:, None]) * D + offs_d[None, :], mask=hmask[:, None], other=0.0)
    qt = tl.trans(q)  # [D, HP]: K-major B operand
    w = tl.load(w_ptr + t * H + offs_h, mask=hmask, other=0.0)
    row_cand = cand_ptr + t * C
    row_out = out_ptr + t * C
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


# ---------------------------------------------------------------------------------------------------------------
# Selection of a short row (``topk_slots``: pools of <= 16384 candidates), fused with the gather of slot ids.
# One program per row holds the whole row in registers as order-preserving int32 keys (``topk.triton._keys_of``:
# -0.0 folded to +0.0, NaN and -inf never selected), so the threshold costs one read of the logits:
#   1. the exact threshold (``_kth_keys``): 2^LB-bin tl.histogram rounds over [min, max] of the valid keys, each
#      narrowing to the bin that holds the k-th largest, until that bin is one key P (then ``rem`` of its ties are
#      taken) or is taken whole (every key >= P);
#   2. the write pass over tiles of PB columns (the row again, from L1/L2: the whole-row tensors of this pass would
#      double the registers of a program, see tests/kernels/sm90_compile.py --topk-short): one packed inclusive
#      cumsum in column order (keys above P in the low 16 bits, keys equal to P in the high 16), carried across
#      tiles, ranks the ties by column, so the lowest columns win (``topk_rows``'s rule), and gives each selected
#      entry its output slot: the selection is written in pool order, as slot ids cand[row, col];
#   3. -1 padding after the min(k, valid) selected entries.
# BY_ID: ties at P go to the lower tie id (tie[r, j]: a re-rank layer passes its pool's key positions, so its
# rule is the model's, lower position first, whatever the pool's order), not the lower j: when P's tie group holds
# more keys than needed, a second ``_kth_keys`` over -id among the ties sets the id threshold Q (ids are distinct,
# so Q takes exactly the rest).
# W (the row padded to a power of two) is the only shape constexpr. C and the strides are specialised by the
# launcher (divisible by 16 or not: pools of 4096 / 8192 / 16384 then load 16 B per instruction); k is not.
@triton.jit
def _bit_length(x):
    """Bits of the int64 scalar x >= 0 (0 for 0), by halving: no serial loop of shifts."""
    n = tl.zeros([], tl.int64)
    for s in tl.static_range(6):
        t = x >> (32 >> s)
        big = t != 0
        x = tl.where(big, t, x)
        n += tl.where(big, 32 >> s, 0)
    return n + (x != 0).to(tl.int64)


@triton.jit
def _kth_keys(key, need, LB: tl.constexpr):
    """The need-th largest of the valid keys (!= INT_MIN) of a row held in registers, as ``topk.triton._kth_r``
    (same results: P, rem, eq, cnt) with the validity folded into the range test: INT_MIN lies below every range
    [P, P + w) of valid keys, so its unsigned offset key - P is never below w."""
    NBIN: tl.constexpr = 1 << LB
    ok = key != -2147483648
    cnt = tl.sum(ok.to(tl.int32), axis=0)
    P = tl.min(tl.where(ok, key, 2147483647), axis=0)
    w = tl.max(key, axis=0).to(tl.int64) - P.to(tl.int64) + 1      # width of the range that holds the rem-th
    rem = tl.minimum(need, cnt)
    eq = rem
    busy = (rem > 0) & (rem < cnt)
    jb = tl.arange(0, NBIN)
    while busy:
        shift = tl.maximum(_bit_length(w - 1) - LB, 0)      # the least shift with (w - 1) >> shift < NBIN
        d = (key - P).to(tl.uint32, bitcast=True)
        h = tl.histogram((d >> shift.to(tl.uint32)).to(tl.int32), NBIN, mask=d < w.to(tl.uint32))
        P, rem, w, eq, busy = _narrow(h, jb, rem, P, w, shift)
    return P, rem, eq, cnt


@triton.jit
def _store_where(ptrs, val, msk, ASM: tl.constexpr):
    """ptrs[i] = val[i] where msk. ASM (compiled code): one predicated st.global per entry from the registers
    where it is; tl.store of a scattered tile first moves pointers, values and mask through shared memory into a
    layout of its own (as ``topk.triton._scatter`` explains)."""
    if ASM:
        tl.inline_asm_elementwise("{ .reg .pred p; setp.ne.b32 p, $3, 0; @p st.global.b32 [$1], $2; "
                                  "mov.b32 $0, 0; }", "=r,l,r,r",
                                  [ptrs.to(tl.int64, bitcast=True), val, msk.to(tl.int32)],
                                  dtype=tl.int32, is_pure=False, pack=1)
    else:
        tl.store(ptrs, val, mask=msk)


@triton.jit(do_not_specialize=["k"])
def _topk_slots_kernel(x_ptr, cand_ptr, tie_ptr, out_ptr, C, k, sx, sc, st, W: tl.constexpr, LB: tl.constexpr,
                       PB: tl.constexpr, ASM: tl.constexpr, BY_ID: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    row = x_ptr + r * sx
    crow = cand_ptr + r * sc
    trow = tie_ptr + r * st
    cols = tl.arange(0, W)
    key = _keys_of(tl.load(row + cols, mask=cols < C, other=float("-inf")))
    P, rem, eq, cnt = _kth_keys(key, k, LB)
    # BY_ID: of the eq keys equal to P, the rem with the smallest tie ids win: a second select over -id among the
    # ties. Q = INT_MIN (every id passes) when all ties are taken
    Q = tl.zeros([], tl.int32) + (-2147483648)
    qrem = rem
    if BY_ID:
        if rem < eq:
            idr = tl.load(trow + cols, mask=cols < C, other=-1)
            Q, qrem, _, _ = _kth_keys(tl.where(key == P, -idr, -2147483648), rem, LB)
    m = tl.minimum(k, cnt)
    outr = out_ptr + r * k
    ar = tl.arange(0, PB)
    # invalid keys (INT_MIN) are below P (a valid key, or INT_MAX when the row has none): never selected
    carry = tl.zeros([], tl.int32)
    for off in range(0, tl.where(m > 0, C, 0), PB):
        c = off + ar
        kt = _keys_of(tl.load(row + c, mask=c < C, other=float("-inf")))
        above = kt > P
        tie = kt == P
        if BY_ID:
            nid = -tl.load(trow + c, mask=tie, other=0)
            above = above | (tie & (nid > Q))
            tie = tie & (nid == Q)
        cs = carry + tl.cumsum(above.to(tl.int32) | (tie.to(tl.int32) << 16), axis=0)  # <= 16384 each: no carry
        nt = cs >> 16                                       # ties up to this column
        sel = above | (tie & (nt <= qrem))
        pos = (cs & 0xFFFF) + tl.minimum(nt, qrem) - 1      # selected entries up to this column
        _store_where(outr + pos, tl.load(crow + c, mask=sel, other=-1), sel, ASM)
        carry = tl.max(cs, axis=0)                          # monotone: the tile's last
    for off in range(m, k, PB):
        tl.store(outr + off + ar, tl.full([PB], -1, tl.int32), mask=off + ar < k)


def topk_slots_config(c: int, by_id: bool = False) -> dict:
    """Histogram bits per round (32 bins: faster than 64 or 256 on the H200, run 66), warps, write tile (4 columns
    per thread). Warps: 4 up to 4096 columns, 8 above (sm_90a registers at 32 bins, sm90_compile --topk-short: 63 /
    64 / 100 at 4096 / 8192 / 16384, no spills); with ties by id (``by_id``) the second select's registers: 16 warps
    above 8192 (128 registers and a spill at 8). benchmarks/topk_short.py times the others."""
    if interpreting():
        return dict(LB=4, num_warps=1, PB=64, ASM=False)
    warps = 4 if c <= 4096 else 8 if c <= 8192 or not by_id else 16
    return dict(LB=5, num_warps=warps, PB=128 * warps, ASM=True)


def topk_slots_triton(logits, cand, k, *, out=None, config=None, tie_ids=None):
    """Values logits[r, j]; ties to the lower ``tie_ids[r, j]`` when given, else to the lower j."""
    t, c = cand.shape
    cfg = dict(topk_slots_config(c, tie_ids is not None), **(config or {}))
    if out is None:
        out = torch.empty(t, k, device=logits.device, dtype=torch.int32)
    if t == 0:
        return out
    if c == 0:
        return out.fill_(-1)
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    if cand.dtype != torch.int32 or cand.stride(1) != 1:
        cand = cand.to(torch.int32).contiguous()
    tie = cand if tie_ids is None else tie_ids
    if tie.dtype != torch.int32 or tie.stride(1) != 1:
        tie = tie.to(torch.int32).contiguous()
    _topk_slots_kernel[(t,)](logits, cand, tie, out, c, k, logits.stride(0), cand.stride(0), tie.stride(0),
                             W=max(16, _pow2(c)), LB=cfg["LB"], PB=cfg["PB"], ASM=cfg["ASM"],
                             BY_ID=tie_ids is not None, num_warps=cfg["num_warps"])
    return out
