"""Exact per-row top-k in Triton: sampled bracket, count, compact, exact select (with an exact fallback).

Keys: fp32 bits mapped to an order-preserving int32 (``b`` if ``b >= 0`` else ``b ^ 0x7FFFFFFF``), -0.0 folded
to +0.0; NaN, -inf and out-of-range columns get INT_MIN and are never counted. Inside a bracket the kernel
ranks unique int64 composites ``(key - INT_MIN) << 31 | (2^31 - 1 - col)``, so among equal values the lower
column wins and the k-th element is always unique.

Launches (no host sync):
  1. sample  (R programs):    read ~S entries of the row, sort them, pick a bracket [lo, hi) of keys that
                              should hold the k-th largest (exact when the row has <= S entries).
  2. count   (R x C):         per-chunk counts of valid, >= lo, >= hi (plain stores, no atomics).
  3. compact (R x C):         if the bracket is good (count(>=hi) < m <= count(>=lo), size <= CAP):
                              keys >= hi go straight to the output, keys in [lo, hi) to a scratch list,
                              at offsets given by the prefix of the earlier chunks' counts.
  4. final   (R programs):    exact select of the remaining ``need`` among the scratch list by a 16-ary
                              search on composites, then -1 padding. If the bracket was bad (adversarial
                              data, heavy ties), this program redoes the row alone with an exact 16-ary
                              refinement over the full row (slow, never drops a candidate).
"""
import triton
import triton.language as tl

INT_MIN = -2147483648
INT_MAX = 2147483647


@triton.jit
def _row_keys(row_ptr, cols, msk):
    x = tl.load(row_ptr + cols, mask=msk, other=float("-inf")).to(tl.float32)
    x = tl.where(x == 0.0, 0.0, x)
    b = x.to(tl.int32, bitcast=True)
    key = tl.where(b >= 0, b, b ^ 0x7FFFFFFF)
    ok = msk & (x == x) & (x != float("-inf"))
    return tl.where(ok, key, -2147483648)


@triton.jit
def _composite(key, cols):
    kk = key.to(tl.int64) + 2147483647 + 1
    comp = (kk << 31) | (2147483647 - cols).to(tl.int64)
    return tl.where(key != -2147483648, comp, -1)


@triton.jit
def _topk_sample_kernel(x_ptr, stride_r, starts, ends, state, k, S: tl.constexpr, RUN: tl.constexpr):
    r = tl.program_id(0)
    st = tl.load(starts + r)
    en = tl.load(ends + r)
    L = tl.maximum(en - st, 0)
    row = x_ptr + r.to(tl.int64) * stride_r
    i = tl.arange(0, S)
    NR: tl.constexpr = S // RUN
    run = i // RUN
    whole = L <= S
    pos = tl.where(whole, st + i, st + ((run.to(tl.int64) * L) // NR).to(tl.int32) + i % RUN)
    key = _row_keys(row, pos, pos < en)
    srt = tl.sort(key, descending=True)
    nvs = tl.sum((key != -2147483648).to(tl.int32), axis=0)
    rk = k.to(tl.float32) * S / tl.maximum(L, 1).to(tl.float32)
    sd = tl.sqrt(rk)
    r_lo = tl.where(whole, tl.minimum(k, nvs) - 1, (rk + 3.0 * sd + 2.0).to(tl.int32))
    r_hi = tl.where(whole, tl.minimum(k, nvs) - 1, (rk - 3.0 * sd - 2.0).to(tl.int32))
    r_hi = tl.where(whole | (rk - 3.0 * sd - 2.0 >= 0.0), r_hi, -1)
    v_lo = tl.sum(tl.where(i == r_lo, srt, 0), axis=0)
    v_hi = tl.sum(tl.where(i == r_hi, srt, 0), axis=0)
    lo = tl.where((r_lo >= 0) & (r_lo < nvs), v_lo, -2147483647)
    lo = tl.maximum(lo, -2147483647)
    hi = tl.where((r_hi >= 0) & (r_hi < nvs), v_hi + 1, 2147483647)
    base = state + r * 8
    tl.store(base + 0, lo)
    tl.store(base + 1, hi)


@triton.jit
def _topk_count_kernel(x_ptr, stride_r, starts, ends, state, cc, NC, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    """Per-chunk counts cc[r, c] = (valid, >= lo, >= hi): no atomics, so compaction offsets are a prefix sum."""
    r = tl.program_id(0)
    c = tl.program_id(1)
    st = tl.load(starts + r)
    en = tl.load(ends + r)
    lo = tl.load(state + r * 8 + 0)
    hi = tl.load(state + r * 8 + 1)
    b0 = st + c * CHUNK
    b1 = tl.minimum(en, b0 + CHUNK)
    row = x_ptr + r.to(tl.int64) * stride_r
    nv = tl.zeros([BLOCK], tl.int32)
    nl = tl.zeros([BLOCK], tl.int32)
    nh = tl.zeros([BLOCK], tl.int32)
    for off in range(b0, b1, BLOCK):
        cols = off + tl.arange(0, BLOCK)
        key = _row_keys(row, cols, cols < b1)
        nv += (key != -2147483648).to(tl.int32)
        nl += (key >= lo).to(tl.int32)
        nh += (key >= hi).to(tl.int32)
    p = cc + (r.to(tl.int64) * NC + c) * 4
    tl.store(p + 0, tl.sum(nv, axis=0))
    tl.store(p + 1, tl.sum(nl, axis=0))
    tl.store(p + 2, tl.sum(nh, axis=0))


@triton.jit
def _chunk_totals(cc, r, NC, upto, NCP: tl.constexpr):
    """(valid, >=lo, >=hi) summed over all chunks, and (>=hi, in-bracket) summed over chunks < upto."""
    j = tl.arange(0, NCP)
    p = cc + (r.to(tl.int64) * NC + j) * 4
    msk = j < NC
    v = tl.load(p + 0, mask=msk, other=0)
    l = tl.load(p + 1, mask=msk, other=0)
    h = tl.load(p + 2, mask=msk, other=0)
    before = j < upto
    return (tl.sum(v, axis=0), tl.sum(l, axis=0), tl.sum(h, axis=0), tl.sum(tl.where(before, h, 0), axis=0),
            tl.sum(tl.where(before, l - h, 0), axis=0))


@triton.jit
def _topk_compact_kernel(x_ptr, stride_r, starts, ends, state, cc, NC, out, scr, k, CAP: tl.constexpr,
                         CHUNK: tl.constexpr, BLOCK: tl.constexpr, NCP: tl.constexpr):
    r = tl.program_id(0)
    c = tl.program_id(1)
    st = tl.load(starts + r)
    en = tl.load(ends + r)
    lo = tl.load(state + r * 8 + 0)
    hi = tl.load(state + r * 8 + 1)
    nv, clo, chi, bo, bs = _chunk_totals(cc, r, NC, c, NCP)
    m = tl.minimum(nv, k)
    good = (m > 0) & (clo >= m) & (chi < m) & (clo - chi <= CAP)
    b0 = st + c * CHUNK
    b1 = tl.minimum(en, b0 + CHUNK)
    if good & (b0 < b1):
        row = x_ptr + r.to(tl.int64) * stride_r
        outr = out + r.to(tl.int64) * k
        scrr = scr + r.to(tl.int64) * CAP
        for off in range(b0, b1, BLOCK):
            cols = off + tl.arange(0, BLOCK)
            key = _row_keys(row, cols, cols < b1)
            s_hi = (key >= hi).to(tl.int32)
            s_in = ((key >= lo) & (key < hi)).to(tl.int32)
            n1 = tl.sum(s_hi, axis=0)
            if n1 > 0:
                tl.store(outr + bo + tl.cumsum(s_hi, axis=0) - 1, cols, mask=s_hi != 0)
                bo += n1
            n2 = tl.sum(s_in, axis=0)
            if n2 > 0:
                tl.store(scrr + bs + tl.cumsum(s_in, axis=0) - 1, _composite(key, cols), mask=s_in != 0)
                bs += n2


@triton.jit
def _pick(j, J, v):
    return tl.sum(tl.where(j == J, v, 0), axis=0)


@triton.jit
def _fallback_row(row, st, en, m, nv, outr, scrr, CAP: tl.constexpr, BLOCK: tl.constexpr, NB: tl.constexpr):
    """Exact single-program path: 16-ary refinement of a composite bracket over the whole row, then compact."""
    j = tl.arange(0, NB)
    lo = tl.zeros([], tl.int64)
    hi = tl.zeros([], tl.int64) + 9223372036854775807
    chi = tl.zeros([], tl.int32)
    n_in = nv
    while n_in > CAP:
        step = (hi - lo) // NB + 1
        t = lo + j.to(tl.int64) * step
        cnt = tl.zeros([NB], tl.int32)
        for off in range(st, en, BLOCK):
            cols = off + tl.arange(0, BLOCK)
            comp = _composite(_row_keys(row, cols, cols < en), cols)
            cnt += tl.sum((comp[:, None] >= t[None, :]).to(tl.int32), axis=0)
        J = tl.max(tl.where(cnt >= m, j, -1), axis=0)
        has_next = J + 1 < NB
        lo_new = _pick(j, J, t)
        hi = tl.where(has_next, _pick(j, J + 1, t), hi)
        chi = tl.where(has_next, _pick(j, J + 1, cnt), chi)
        n_in = _pick(j, J, cnt) - chi
        lo = lo_new
    bo = tl.zeros([], tl.int32)
    bs = tl.zeros([], tl.int32)
    for off in range(st, en, BLOCK):
        cols = off + tl.arange(0, BLOCK)
        comp = _composite(_row_keys(row, cols, cols < en), cols)
        s_hi = (comp >= hi).to(tl.int32)
        s_in = ((comp >= lo) & (comp < hi)).to(tl.int32)
        tl.store(outr + bo + tl.cumsum(s_hi, axis=0) - 1, cols, mask=s_hi != 0)
        tl.store(scrr + bs + tl.cumsum(s_in, axis=0) - 1, comp, mask=s_in != 0)
        bo += tl.sum(s_hi, axis=0)
        bs += tl.sum(s_in, axis=0)
    return chi, n_in


@triton.jit
def _select_write(scrr, n_in, need, outp, FB: tl.constexpr, NB: tl.constexpr):
    """Write the column ids of the ``need`` largest of the n_in unique composites in scrr to outp[0:need]."""
    ar = tl.arange(0, FB)
    j = tl.arange(0, NB)
    mn = tl.zeros([], tl.int64) + 9223372036854775807
    mx = tl.zeros([], tl.int64) - 1
    for off in range(0, n_in, FB):
        msk = off + ar < n_in
        cv = tl.load(scrr + off + ar, mask=msk, other=-1)
        mx = tl.maximum(mx, tl.max(cv, axis=0))
        mn = tl.minimum(mn, tl.min(tl.where(msk, cv, 9223372036854775807), axis=0))
    lo = mn
    hi = mx + 1
    T = mn
    busy = need < n_in
    while busy:
        step = (hi - lo) // NB + 1
        t = lo + j.to(tl.int64) * step
        cnt = tl.zeros([NB], tl.int32)
        for off in range(0, n_in, FB):
            cv = tl.load(scrr + off + ar, mask=off + ar < n_in, other=-1)
            cnt += tl.sum((cv[:, None] >= t[None, :]).to(tl.int32), axis=0)
        J = tl.max(tl.where(cnt >= need, j, -1), axis=0)
        T = _pick(j, J, t)
        busy = _pick(j, J, cnt) != need
        hi = tl.where(J + 1 < NB, _pick(j, J + 1, t), hi)
        lo = T
    b = tl.zeros([], tl.int32)
    for off in range(0, n_in, FB):
        cv = tl.load(scrr + off + ar, mask=off + ar < n_in, other=-1)
        sel = (cv >= T).to(tl.int32)
        col = (2147483647 - (cv & 2147483647)).to(tl.int32)
        tl.store(outp + b + tl.cumsum(sel, axis=0) - 1, col, mask=sel != 0)
        b += tl.sum(sel, axis=0)


@triton.jit
def _topk_final_kernel(x_ptr, stride_r, starts, ends, state, cc, NC, out, scr, k, CAP: tl.constexpr,
                       BLOCK: tl.constexpr, FB: tl.constexpr, NB: tl.constexpr, NCP: tl.constexpr):
    r = tl.program_id(0)
    st = tl.load(starts + r)
    en = tl.load(ends + r)
    nv, clo, chi, _bo, _bs = _chunk_totals(cc, r, NC, 0, NCP)
    m = tl.minimum(nv, k)
    good = (m > 0) & (clo >= m) & (chi < m) & (clo - chi <= CAP)
    outr = out + r.to(tl.int64) * k
    scrr = scr + r.to(tl.int64) * CAP
    if m > 0:
        n_in = clo - chi
        if good == 0:
            row = x_ptr + r.to(tl.int64) * stride_r
            chi, n_in = _fallback_row(row, st, en, m, nv, outr, scrr, CAP, BLOCK, NB)
        _select_write(scrr, n_in, m - chi, outr + chi, FB, NB)
    ar = tl.arange(0, FB)
    for off in range(m, k, FB):
        tl.store(outr + off + ar, tl.full([FB], -1, tl.int32), mask=off + ar < k)
