"""Triton kernels for indexer logits: prefill (dense keys, ragged row windows) and decode (paged FP8 key cache).

Prefill: one program owns BQ query rows x all H heads (N = BQ*HP columns, HP = H
rounded up to a power of two, padded heads get zero weight) and walks the key tiles of its block's window
[min row_start, max row_end) with BKV keys as the MMA M dimension:
    acc[BKV, BQ*HP] = k_fp8 @ q_fp8^T          (fp8 tensor cores, fp32 accumulate)
    acc -> [BKV, BQ, HP] -> relu -> * w -> sum over heads -> * k_scale -> mask -> store [BQ, BKV]
Key tiles outside the block's window are filled with -inf without any compute.

Fused prefill top-k (``_prefill_candidates_atomic_kernel``): the same scores, but instead of storing [BQ, BKV]
each tile appends the scores >= a per-row threshold (with their columns) to the row's candidate list, each entry
at a slot taken by an atomic increment (lists in no particular order); ``ops`` picks the threshold from a sample,
selects exactly among the candidates (ties by column) and reruns the rows whose list overflowed or fell short
through the two-pass path.

Quantisation (``_indexer_quantize_kernel``): rows of 128 (queries, keys) to e4m3 + power-of-two scale in one pass,
optionally folding the query scale into the indexer weights.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from indexcache.kernels._dispatch import interpreting
from indexcache.kernels import formats as F
from indexcache.kernels.kv_store.triton import _e4m3_bits, _pow2_scale

_PAGE: tl.constexpr = tl.constexpr(F.PAGE)
_PAGE_BYTES: tl.constexpr = tl.constexpr(F.INDEX_PAGE_BYTES)
_SCALES_AT: tl.constexpr = tl.constexpr(F.INDEX_SCALES_AT)
_D: tl.constexpr = tl.constexpr(F.INDEX_DIM)


@triton.jit
def _block_windows(rs_ptr, re_ptr, q0, T, S, BQ: tl.constexpr, BKV: tl.constexpr):
    """Rows q0..q0+BQ of a block: their clamped windows and the block's key-tile range [lo_t, hi)."""
    rows = q0 + tl.arange(0, BQ)
    rmask = rows < T
    rs = tl.maximum(tl.load(rs_ptr + rows, mask=rmask, other=0).to(tl.int32), 0)
    re = tl.minimum(tl.load(re_ptr + rows, mask=rmask, other=0).to(tl.int32), S)
    empty = re <= rs
    lo = tl.min(tl.where(empty, S, rs), axis=0)
    hi = tl.max(tl.where(empty, 0, re), axis=0)
    lo_t = tl.where(hi > lo, (lo // BKV) * BKV, 0)
    return rows, rmask, rs, re, lo_t, hi


@triton.jit
def _load_block_q(q_ptr, w_ptr, q0, T, H: tl.constexpr, HP: tl.constexpr, BQ: tl.constexpr):
    """q^T [D, BQ*HP] and the folded weights [BQ, HP] of a block (padded heads and rows past T are zero)."""
    D: tl.constexpr = _D
    offs_d = tl.arange(0, D)
    offs_n = tl.arange(0, BQ * HP)
    n_row = q0 + offs_n // HP
    n_head = offs_n % HP
    n_ok = (n_row < T) & (n_head < H)
    q = tl.load(q_ptr + (n_row.to(tl.int64) * H + n_head)[:, None] * D + offs_d[None, :],
                mask=n_ok[:, None], other=0.0)  # [BQ*HP, D]
    w = tl.load(w_ptr + n_row.to(tl.int64) * H + n_head, mask=n_ok, other=0.0)
    return tl.trans(q), tl.reshape(w, [BQ, HP])


@triton.jit
def _tile_scores(k_ptr, ks_ptr, offs_s, S, qt, w3, BQ: tl.constexpr, HP: tl.constexpr, BKV: tl.constexpr):
    """Scores [BKV, BQ] of one key tile: k_scale * sum_h w * relu(k . q_h). Every prefill kernel scores through
    this one function, so their scores are bit-identical."""
    D: tl.constexpr = _D
    offs_d = tl.arange(0, D)
    # keys past S (the last tile) read key S-1 instead of being masked: no per-row predicates on the copies;
    # every caller masks those columns out (they lie past every window)
    offs_c = tl.minimum(offs_s, S - 1)
    k = tl.load(k_ptr + offs_c[:, None] * D + offs_d[None, :])
    ks = tl.load(ks_ptr + offs_c)
    acc = tl.dot(k, qt)  # [BKV, BQ*HP]
    acc = tl.reshape(acc, [BKV, BQ, HP])
    lg = tl.sum(tl.maximum(acc, 0.0) * w3[None, :, :], axis=2)  # [BKV, BQ]
    return lg * ks[:, None]


@triton.jit(do_not_specialize=["T", "S", "stride_out"])  # chunk shapes vary: one compile, not 8
def _prefill_logits_kernel(q_ptr, w_ptr, k_ptr, ks_ptr, rs_ptr, re_ptr, out_ptr,
                           T, S, stride_out,
                           H: tl.constexpr, HP: tl.constexpr, BQ: tl.constexpr, BKV: tl.constexpr):
    pid = tl.program_id(0)
    q0 = pid * BQ
    rows, rmask, rs, re, lo_t, hi = _block_windows(rs_ptr, re_ptr, q0, T, S, BQ, BKV)
    hi_t = tl.where(hi > lo_t, lo_t + tl.cdiv(hi - lo_t, BKV) * BKV, 0)

    offs_kv = tl.arange(0, BKV)
    out_rows = out_ptr + rows.to(tl.int64)[:, None] * stride_out  # [BQ, 1]
    neg_inf = tl.full([BQ, BKV], float("-inf"), tl.float32)

    for s0 in range(0, lo_t, BKV):
        offs_s = s0 + offs_kv
        tl.store(out_rows + offs_s[None, :], neg_inf, mask=rmask[:, None] & (offs_s[None, :] < S))

    qt, w3 = _load_block_q(q_ptr, w_ptr, q0, T, H, HP, BQ)
    for s0 in range(lo_t, hi, BKV):
        offs_s = s0 + offs_kv
        smask = offs_s < S
        lg = tl.trans(_tile_scores(k_ptr, ks_ptr, offs_s, S, qt, w3, BQ, HP, BKV))  # [BQ, BKV]
        ok = (offs_s[None, :] >= rs[:, None]) & (offs_s[None, :] < re[:, None])
        lg = tl.where(ok, lg, float("-inf"))
        tl.store(out_rows + offs_s[None, :], lg, mask=rmask[:, None] & smask[None, :])

    for s0 in range(hi_t, S, BKV):
        offs_s = s0 + offs_kv
        tl.store(out_rows + offs_s[None, :], neg_inf, mask=rmask[:, None] & (offs_s[None, :] < S))


_FMAX: tl.constexpr = tl.constexpr(3.4028234663852886e38)


def _append_asm() -> str:
    """PTX of ``_append`` for 4 entries (operands: 4 outputs, then lg, thr, col, row, ctr, cap, cv, cc, 4 each)."""
    op = lambda k, e: f"${4 + 4 * k + e}"  # noqa: E731 - operand k of entry e
    lines = ["{", ".reg .pred p<4>, pa, own;", ".reg .u32 l, o;", ".reg .u64 a, b;"]
    lines += [f"setp.ge.f32 p{e}, {op(0, e)}, {op(1, e)};" for e in range(4)]
    lines += [f"selp.u32 ${e}, 1, 0, p{e};" for e in range(4)]
    lines += ["or.pred pa, p0, p1;", "or.pred pa, pa, p2;", "or.pred pa, pa, p3;", "@!pa bra DONE;",
              "mov.u32 l, %laneid;", "and.b32 l, l, 3;", "setp.eq.u32 own, l, 0;"]
    for e in range(4):
        p = f"p{e}"
        lines += [f"and.pred {p}, {p}, own;",
                  f"@{p} atom.relaxed.cta.global.add.u32 o, [{op(4, e)}], 1;",
                  f"@{p} setp.lt.u32 {p}, o, {op(5, e)};",
                  f"@{p} mul.wide.u32 a, {op(3, e)}, {op(5, e)};",
                  f"@{p} cvt.u64.u32 b, o;",
                  f"@{p} add.u64 a, a, b;",
                  f"@{p} shl.b64 a, a, 2;",
                  f"@{p} add.u64 b, a, {op(6, e)};",
                  f"@{p} st.global.f32 [b], {op(0, e)};",
                  f"@{p} add.u64 b, a, {op(7, e)};",
                  f"@{p} st.global.b32 [b], {op(2, e)};"]
    lines += ["DONE:", "}"]
    return "\n".join(lines)


_APPEND_ASM: tl.constexpr = tl.constexpr(_append_asm())
_APPEND_CONSTRAINTS: tl.constexpr = tl.constexpr(",".join(["=r"] * 4 + ["f"] * 8 + ["r"] * 8 + ["l"] * 4 + ["r"] * 4
                                                          + ["l"] * 8))


@triton.jit
def _append(ctr, cv_ptr, cc_ptr, row, cap, lg, thr, col, ASM: tl.constexpr):
    """Append the entries lg >= thr to their row's list: slot = atomic increment of the row's counter ctr;
    value and column stored where slot < cap. Returns (lg >= thr) as int32.
    ASM (compiled code): lg comes from the head reduction, whose result every quad of lanes holds 4 times (the
    MMA columns, i.e. the heads, sit on lane bits 0-1), so the lane with (lane & 3) == 0 appends. Four entries
    per asm block and a branch over the whole append when none passes: a tile without candidates costs one
    compare per entry. (Triton's own atomic and stores would move every entry through shared memory first.)"""
    if ASM:
        z64 = tl.zeros(lg.shape, tl.int64)
        return tl.inline_asm_elementwise(
            _APPEND_ASM, _APPEND_CONSTRAINTS,
            [lg, thr, col, row, ctr.to(tl.int64, bitcast=True), cap + tl.zeros(lg.shape, tl.int32),
             (cv_ptr + z64).to(tl.int64, bitcast=True), (cc_ptr + z64).to(tl.int64, bitcast=True)],
            dtype=tl.int32, is_pure=False, pack=4)
    take = lg >= thr
    slot = tl.atomic_add(ctr, tl.full(lg.shape, 1, tl.int32), mask=take, sem="relaxed", scope="cta")
    keep = take & (slot < cap)
    dst = row.to(tl.int64) * cap + slot
    tl.store(cv_ptr + dst, lg, mask=keep)
    tl.store(cc_ptr + dst, col, mask=keep)
    return take.to(tl.int32)


@triton.jit(do_not_specialize=["T", "S", "cap"])
def _prefill_candidates_atomic_kernel(q_ptr, w_ptr, k_ptr, ks_ptr, rs_ptr, re_ptr, thr_ptr, cv_ptr, cc_ptr, cnt_ptr,
                                      T, S, cap,
                                      H: tl.constexpr, HP: tl.constexpr, BQ: tl.constexpr, BKV: tl.constexpr,
                                      ASM: tl.constexpr):
    """Fused logits + threshold filter: the valid scores >= thr[row] of each row's window appended to the row's
    candidate list (values cv, columns cc; ``cap`` slots per row), in no particular order: each candidate takes
    its slot by a relaxed atomic increment of cnt[row, 0] (zeroed by the launcher), so a tile needs no cumsum and
    no cross-warp step; slots >= cap are not written. cnt[row] = (candidates found, all of them, not only the kept
    ones; valid scores in the window). Scores never reach memory otherwise. Blocks run last-first: in a causal
    prefill the last rows have the longest windows, and starting them first shortens the tail of the grid.
    Tiles inside every live row's window ("inner") skip the window test: the threshold test alone rejects NaN and
    -inf (a -inf threshold becomes -FLT_MAX), and their valid count is the key count when the running sum of
    their scores stays finite (it does iff every score is finite; otherwise a second pass counts them). Edge
    tiles mask the window and count one by one."""
    pid = tl.num_programs(0) - 1 - tl.program_id(0)
    q0 = pid * BQ
    rows, rmask, rs, re, lo_t, hi = _block_windows(rs_ptr, re_ptr, q0, T, S, BQ, BKV)
    live = rmask & (re > rs)
    thr = tl.load(thr_ptr + rows, mask=rmask, other=0.0)
    thr = tl.where(live, tl.maximum(thr, -_FMAX), float("nan"))  # NaN: an empty row takes nothing
    in_lo = tl.max(tl.where(live, rs, 0), axis=0)  # tiles within [in_lo, in_hi) are inside every live window
    in_hi = tl.min(tl.where(live, re, S), axis=0)
    offs_kv = tl.arange(0, BKV)
    qt, w3 = _load_block_q(q_ptr, w_ptr, q0, T, H, HP, BQ)
    zero = tl.zeros([BKV, BQ], tl.int32)
    ctr = cnt_ptr + (rows.to(tl.int64) * 2)[None, :] + zero
    row2 = rows[None, :] + zero
    thr2 = thr[None, :] + tl.zeros([BKV, BQ], tl.float32)
    nv = tl.zeros([BKV, BQ], tl.int32)  # valid scores of the edge tiles
    chk = tl.zeros([BKV, BQ], tl.float32)  # sum of the inner tiles' scores
    n_in = 0
    for s0 in range(lo_t, hi, BKV):
        offs_s = s0 + offs_kv
        lg = _tile_scores(k_ptr, ks_ptr, offs_s, S, qt, w3, BQ, HP, BKV)  # [BKV, BQ]
        if (s0 < in_lo) | (s0 + BKV > in_hi):
            ok = (offs_s[:, None] >= rs[None, :]) & (offs_s[:, None] < re[None, :])
            lg = tl.where(ok, lg, float("nan"))
            nv += (lg >= -_FMAX).to(tl.int32)
        else:
            chk += lg
            n_in += BKV
        _append(ctr, cv_ptr, cc_ptr, row2, cap, lg, thr2, offs_s[:, None] + zero, ASM)
    nv = tl.sum(nv, axis=0)
    fin = tl.sum((tl.abs(chk) <= _FMAX).to(tl.int32), axis=0) == BKV
    if tl.sum((live & ~fin).to(tl.int32), axis=0) == 0:
        nv += n_in
    else:  # a NaN or infinite score in some inner tile (or a sum past FLT_MAX): count them one by one
        nvi = tl.zeros([BKV, BQ], tl.int32)
        for s0 in range(lo_t, hi, BKV):
            if (s0 >= in_lo) & (s0 + BKV <= in_hi):
                offs_s = s0 + offs_kv
                lg = _tile_scores(k_ptr, ks_ptr, offs_s, S, qt, w3, BQ, HP, BKV)
                nvi += (lg >= -_FMAX).to(tl.int32)
        nv += tl.sum(nvi, axis=0)
    tl.store(cnt_ptr + rows.to(tl.int64) * 2 + 1, tl.where(live, nv, 0), mask=rmask)


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def prefill_config(h: int) -> dict:
    """Launch parameters for H heads (tuned on H200, see docs/kernels_indexer.md)."""
    hp = max(16, _pow2(h))
    bq = max(1, 128 // hp)
    if interpreting():
        return dict(BQ=bq, BKV=64, num_warps=4, num_stages=1)
    # N = BQ*HP = 256 columns, 64-key tiles; 4 warps for H<=32, 8 for H=64 (docs/kernels_indexer.md)
    return dict(BQ=max(1, 256 // hp), BKV=64, num_warps=4 if hp <= 32 else 8, num_stages=3)


def candidates_config(h: int) -> dict:
    """Launch parameters of the fused candidates kernel: N = BQ*HP = 128 MMA columns, 128-key tiles, 4 warps
    (H>32: the same N=128 shape, BQ=2 at H=64; benchmarks/indexer_fused.py sweeps them)."""
    hp = max(16, _pow2(h))
    if interpreting():
        return dict(BQ=max(1, 128 // hp), BKV=64, num_warps=4, num_stages=1)
    return dict(BQ=max(1, 128 // hp), BKV=128, num_warps=4, num_stages=3)


def indexer_logits_triton(q_fp8, w, k_fp8, k_scale, row_start, row_end, *, out=None, config=None):
    t, h, _ = q_fp8.shape
    s = k_fp8.shape[0]
    cfg = dict(prefill_config(h), **(config or {}))
    hp = max(16, _pow2(h))
    if out is None:
        out = torch.empty(t, s, device=q_fp8.device, dtype=torch.float32)
    if t == 0:
        return out
    q_fp8 = q_fp8.contiguous()
    k_fp8 = k_fp8.contiguous()
    grid = (triton.cdiv(t, cfg["BQ"]),)
    _prefill_logits_kernel[grid](
        q_fp8, w.contiguous(), k_fp8, k_scale.contiguous(), row_start.contiguous(), row_end.contiguous(), out,
        t, s, out.stride(0), H=h, HP=hp, BQ=cfg["BQ"], BKV=cfg["BKV"],
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return out


def indexer_candidates_triton(q_fp8, w, k_fp8, k_scale, row_start, row_end, thr, cand_val, cand_col, counts,
                              *, config=None):
    """Launch the fused candidates kernel (``_prefill_candidates_atomic_kernel``): cand_val [T,cap] fp32, cand_col
    [T,cap] int32, counts [T,2] int32."""
    t, h, _ = q_fp8.shape
    s = k_fp8.shape[0]
    cfg = candidates_config(h)
    unknown = sorted(set(config or {}) - set(cfg))
    if unknown:
        raise ValueError(f"indexer_candidates: unknown config keys {unknown}; the keys are {sorted(cfg)}")
    cfg.update(config or {})
    hp = max(16, _pow2(h))
    if t == 0:
        return
    grid = (triton.cdiv(t, cfg["BQ"]),)
    args = (q_fp8.contiguous(), w.contiguous(), k_fp8.contiguous(), k_scale.contiguous(), row_start.contiguous(),
            row_end.contiguous(), thr.contiguous(), cand_val, cand_col, counts, t, s, cand_val.shape[1])
    meta = dict(H=h, HP=hp, BQ=cfg["BQ"], BKV=cfg["BKV"], num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    counts[:, 0].zero_()  # the slot counters
    _prefill_candidates_atomic_kernel[grid](*args, ASM=not interpreting(), **meta)


@triton.jit(do_not_specialize=["max_len", "bt_stride", "max_pages"])
def _decode_logits_kernel(q_ptr, w_ptr, kc8_ptr, kcs_ptr, bt_ptr, ctx_ptr, out_ptr,
                          max_len, bt_stride, max_pages,
                          H: tl.constexpr, HP: tl.constexpr, PAGES: tl.constexpr):
    D: tl.constexpr = _D
    PG: tl.constexpr = _PAGE
    PB: tl.constexpr = _PAGE_BYTES
    BT: tl.constexpr = PAGES * PG
    b = tl.program_id(0)
    blk = tl.program_id(1)
    ctx = tl.minimum(tl.load(ctx_ptr + b), max_len)
    offs_t = blk * BT + tl.arange(0, BT)
    omask = offs_t < max_len
    valid = offs_t < ctx
    if blk * BT < ctx:
        pidx = offs_t // PG
        page = tl.load(bt_ptr + b.to(tl.int64) * bt_stride + pidx, mask=valid & (pidx < max_pages), other=0)
        base = page.to(tl.int64) * PB
        off = offs_t % PG
        offs_d = tl.arange(0, D)
        k = tl.load(kc8_ptr + (base + off * D)[:, None] + offs_d[None, :], mask=valid[:, None], other=0.0)
        ks = tl.load(kcs_ptr + (base // 4 + _SCALES_AT // 4 + off), mask=valid, other=0.0)
        offs_h = tl.arange(0, HP)
        hmask = offs_h < H
        q = tl.load(q_ptr + (b.to(tl.int64) * H + offs_h[:, None]) * D + offs_d[None, :], mask=hmask[:, None], other=0.0)
        w = tl.load(w_ptr + b.to(tl.int64) * H + offs_h, mask=hmask, other=0.0)
        acc = tl.dot(k, tl.trans(q))  # [BT, HP]
        lg = tl.sum(tl.maximum(acc, 0.0) * w[None, :], axis=1) * ks
        lg = tl.where(valid, lg, float("-inf"))
        tl.store(out_ptr + b.to(tl.int64) * max_len + offs_t, lg, mask=omask)
    else:
        tl.store(out_ptr + b.to(tl.int64) * max_len + offs_t, tl.full([BT], float("-inf"), tl.float32), mask=omask)


def decode_config(h: int) -> dict:
    if interpreting():
        return dict(PAGES=1, num_warps=4, num_stages=1)
    return dict(PAGES=2, num_warps=8, num_stages=1)


def indexer_logits_decode_triton(q_fp8, w, kv_cache, block_table, context_lens, max_len, *, out=None, config=None):
    b, h, _ = q_fp8.shape
    cfg = dict(decode_config(h), **(config or {}))
    hp = max(16, _pow2(h))
    if out is None:
        out = torch.empty(b, max_len, device=q_fp8.device, dtype=torch.float32)
    if b == 0 or max_len == 0:
        return out
    bt = F.PAGE * cfg["PAGES"]
    grid = (b, triton.cdiv(max_len, bt))
    _decode_logits_kernel[grid](
        q_fp8.contiguous(), w.contiguous(), kv_cache.view(torch.float8_e4m3fn), kv_cache.view(torch.float32),
        block_table, context_lens, out, max_len, block_table.stride(0), block_table.shape[1],
        H=h, HP=hp, PAGES=cfg["PAGES"], num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return out



# ------------------------------------------------------------------------------------------ q / k quantisation
# The scale and e4m3 rounding are the cache-write kernel's (one rounding for the keys in the cache and the queries
# scored against them): bit-identical to ``formats.quantize_rows``, as x * 2^-e equals x / 2^e exactly.
@triton.jit(do_not_specialize=["R", "stride_x"])  # rows vary with every chunk and decode batch
def _indexer_quantize_kernel(x_ptr, q_ptr, s_ptr, w_ptr, R, stride_x, fold,
                             BR: tl.constexpr, FOLD: tl.constexpr, EMULATE: tl.constexpr):
    """BR rows of 128 -> their e4m3 bits and per row the power-of-two scale, or with FOLD the folded indexer
    weight (w * scale) * fold (the reference's order of products)."""
    D: tl.constexpr = _D
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    ok = rows < R
    r64 = rows.to(tl.int64)
    offs = tl.arange(0, D)
    x = tl.load(x_ptr + r64[:, None] * stride_x + offs[None, :], mask=ok[:, None], other=0.0).to(tl.float32)
    scale, inv = _pow2_scale(tl.max(tl.abs(x), axis=1))
    y = tl.minimum(tl.maximum(x * inv[:, None], -448.0), 448.0)
    tl.store(q_ptr + r64[:, None] * D + offs[None, :], _e4m3_bits(y, EMULATE), mask=ok[:, None])
    if FOLD:
        w = tl.load(w_ptr + r64, mask=ok, other=0.0).to(tl.float32)
        scale = (w * scale) * fold
    tl.store(s_ptr + r64, scale, mask=ok)


QUANT_ROWS = 32  # rows per program: 4096 elements, 32 per thread at 4 warps


def quantize_rows_triton(x, weights=None, fold: float = 1.0, *, out=None):
    """x [..., 128] float -> (x_fp8 [..., 128] e4m3, s [...] fp32) in one launch. s is each row's power-of-two
    scale, or, given ``weights`` (x's leading shape), weights * scale * fold. ``out``: (x_fp8, s) to write into
    (contiguous, those shapes and dtypes)."""
    lead = tuple(x.shape[:-1])
    x2 = x.reshape(-1, _D)
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    if out is None:
        out = (torch.empty(x.shape, dtype=torch.float8_e4m3fn, device=x.device),
               torch.empty(lead, dtype=torch.float32, device=x.device))
    q8, s = out
    if tuple(q8.shape) != tuple(x.shape) or q8.dtype != torch.float8_e4m3fn or not q8.is_contiguous() or \
            tuple(s.shape) != lead or s.dtype != torch.float32 or not s.is_contiguous():
        raise ValueError(f"quantize_rows_triton: out must be contiguous ({tuple(x.shape)} e4m3, {lead} fp32), got "
                         f"({tuple(q8.shape)} {q8.dtype}, {tuple(s.shape)} {s.dtype})")
    r = x2.shape[0]
    if r == 0:
        return out
    fold_w = weights is not None
    w = weights.reshape(-1) if fold_w else s
    _indexer_quantize_kernel[(triton.cdiv(r, QUANT_ROWS),)](
        x2, q8.view(torch.uint8), s, w, r, x2.stride(0), float(fold), BR=QUANT_ROWS, FOLD=fold_w,
        EMULATE=interpreting(), num_warps=4)
    return out
