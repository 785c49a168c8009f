"""Prefill top-k in one launch (``topk_rows(..., _path="one")``): one program per row reads the row once.

Per row r (columns [st, en), m = min(valid entries, k)):
  1. threshold: a stratified sample of ns entries (one per stride of L // ns, at a hashed offset in the stride;
     ns ~ 32 L / k, so about 32 samples fall in the top k whatever L is). ``lo`` = the sample's rank-q key with
     q ~ ns * sqrt(k * CAP) / L, so count(key >= lo) ~ sqrt(k * CAP): 2k at CAP = 4k, ~6 sd from both m and CAP.
     Rows of <= CAP entries take every valid entry (lo = the lowest key).
  2. scan: ONE read of the row, 16-byte vector loads from the aligned-down start (only the first and last block
     are masked). Entries with key >= lo go to the row's scratch as int64 ``key << 32 | col``. Slots: per block
     the [E, T, V] tile (T lanes, V contiguous entries per lane) counts its candidates per lane in registers, one
     exclusive cumsum over the T lane counts gives the lane's base, and the in-lane ranks are register cumsums:
     no atomics, no scan over the whole block. Blocks that would pass CAP store nothing (the row is then bad).
  3. select (same program): the exact m-th largest key by a 4-round 8-bit radix select (``tl.histogram``) over
     the candidates; if the ties at that key are more than needed, the same radix select on the columns of the
     tied entries picks the lowest columns; one write pass. A bad row (count(>= lo) < m or > CAP: maxima the
     sample missed, heavy ties) runs the same select over the whole row instead (a few more reads of the row).
     Then -1 padding.

Keys: the order-preserving int32 of ``triton._row_keys`` (-0.0 folded to +0.0; NaN / -inf -> INT_MIN, never
selected). Every runtime size is ``do_not_specialize``: one compiled variant per dtype and alignment.
"""
import triton
import triton.language as tl

_KMIN = -2147483648


@triton.jit
def _keys_of(x):
    """Order-preserving int32 keys of x (as fp32); -0.0 -> key of +0.0; NaN and -inf -> INT_MIN."""
    x = x.to(tl.float32) + 0.0
    b = x.to(tl.int32, bitcast=True)
    key = b ^ ((b >> 31) & 0x7FFFFFFF)
    # valid keys lie in (key(-inf), key(+inf)]; both NaN signs fall outside
    ok = (key > -2139095041) & (key <= 2139095040)
    return tl.where(ok, key, -2147483648)


@triton.jit
def _tile(src, off, n, st, stride, SRC: tl.constexpr, FB: tl.constexpr):
    """(key, col, ok) of items [off, off + FB) of a source of n items. SRC 0: candidates ``key << 32 | col`` at
    src; 1: the row at src, columns st + i; 2: the row's sample, column st + i * stride + hashed jitter."""
    i = off + tl.arange(0, FB)
    msk = i < n
    if SRC == 0:
        c = tl.load(src + i, mask=msk, other=0)
        key = (c >> 32).to(tl.int32)
        col = (c & 0xFFFFFFFF).to(tl.int32)
        ok = msk
    else:
        if SRC == 1:
            col = st + i
        else:
            col = st + i * stride + ((i * 40503) & 0xFFFF) % stride
        key = _keys_of(tl.load(src + col, mask=msk, other=float("-inf")))
        ok = key != -2147483648
    return key, col, ok


@triton.jit
def _vals(src, off, n, st, stride, tkey, SRC: tl.constexpr, BY_COL: tl.constexpr, FB: tl.constexpr):
    """(v, ok, key, col) of a tile: v = key, or ~col (larger for lower columns) among the items with key == tkey."""
    key, col, ok = _tile(src, off, n, st, stride, SRC, FB)
    if BY_COL:
        ok = ok & (key == tkey)
        v = ~col
    else:
        v = key
    return v, ok, key, col


@triton.jit
def _kth(src, n, st, stride, need, tkey, SRC: tl.constexpr, BY_COL: tl.constexpr, FB: tl.constexpr,
         NBIN: tl.constexpr):
    """Exact select of the need-th largest v among the valid items (v of ``_vals``; need is clamped to their
    count): a min / max pass, then NBIN-bin histogram rounds over [min, max] (bins are powers of two, each round
    narrows to the bin that holds the need-th), until the bin is one value or is taken whole.
    Returns (P, rem, eq, cnt): select v > P, and of the eq items with v == P the rem largest by the next rule
    (all of them when rem == eq; a bin taken whole reports rem == eq with P its lower edge and selects v >= P);
    cnt = the number of valid items."""
    cnt = tl.zeros([], tl.int32)
    vmin = tl.zeros([], tl.int32) + 2147483647
    vmax = tl.zeros([], tl.int32) - 2147483647 - 1
    for off in range(0, n, FB):
        v, ok, key, col = _vals(src, off, n, st, stride, tkey, SRC, BY_COL, FB)
        cnt += tl.sum(ok.to(tl.int32), axis=0)
        vmin = tl.minimum(vmin, tl.min(tl.where(ok, v, 2147483647), axis=0))
        vmax = tl.maximum(vmax, tl.max(tl.where(ok, v, -2147483648), axis=0))
    rem = tl.minimum(need, cnt)
    P = vmin
    w = vmax.to(tl.int64) - vmin.to(tl.int64) + 1          # width of the range that holds the rem-th
    eq = rem
    busy = (rem > 0) & (rem < cnt)
    jb = tl.arange(0, NBIN)
    while busy:
        shift = tl.zeros([], tl.int64)
        while ((w - 1) >> shift) >= NBIN:
            shift += 1
        w32 = w.to(tl.uint32)
        sh32 = shift.to(tl.uint32)
        h = tl.zeros([NBIN], tl.int32)
        for off in range(0, n, FB):
            v, ok, key, col = _vals(src, off, n, st, stride, tkey, SRC, BY_COL, FB)
            d = (v - P).to(tl.uint32, bitcast=True)
            inr = ok & (d < w32)
            h += tl.histogram(tl.where(inr, d >> sh32, 0).to(tl.int32), NBIN, mask=inr)
        ge = tl.sum(h, axis=0) - tl.cumsum(h, axis=0) + h      # items in range with bin >= j
        J = tl.max(tl.where(ge >= rem, jb, -1), axis=0)
        hJ = tl.sum(tl.where(jb == J, h, 0), axis=0)
        rem -= tl.sum(tl.where(jb == J, ge, 0), axis=0) - hJ
        P = P + (J.to(tl.int64) << shift).to(tl.int32)
        w = tl.minimum(w - (J.to(tl.int64) << shift), tl.zeros([], tl.int64) + 1 << shift)
        eq = hJ
        busy = (hJ != rem) & (w > 1)
    return P, rem, eq, cnt


@triton.jit
def _select_write(src, n, st, stride, need, outr, SRC: tl.constexpr, FB: tl.constexpr, NBIN: tl.constexpr):
    """Write the columns of the min(need, valid) largest valid items of the source (ties: lower column) to
    outr; returns how many (the valid count when it is below need)."""
    tk, rem, eq, cnt = _kth(src, n, st, stride, need, 0, SRC, False, FB, NBIN)
    tie_all = rem == eq
    tc = tl.zeros([], tl.int32)
    if tie_all == 0:
        tc, r2, e2, c2 = _kth(src, n, st, stride, rem, tk, SRC, True, FB, NBIN)
    b = tl.zeros([], tl.int32)
    for off in range(0, n, FB):
        key, col, ok = _tile(src, off, n, st, stride, SRC, FB)
        sel = ok & ((key > tk) | ((key == tk) & (tie_all | (~col >= tc))))
        s = sel.to(tl.int32)
        tl.store(outr + b + tl.cumsum(s, axis=0) - 1, col, mask=sel)
        b += tl.sum(s, axis=0)
    return tl.minimum(need, cnt)


@triton.jit
def _scatter(ptrs, key, col, msk, ASM: tl.constexpr):
    """ptrs[i] = key << 32 | col where msk (col >= 0). ASM (compiled code): one predicated 8-byte st.global per
    entry from the registers where the entries are; tl.store would first move pointers, values and mask through
    shared memory into a layout of its own (one entry per lane), which costs more than the scan itself."""
    if ASM:
        tl.inline_asm_elementwise("{ .reg .pred p; setp.ne.b32 p, $4, 0; @p st.global.v2.b32 [$1], {$3, $2}; "
                                  "mov.b32 $0, 0; }", "=r,l,r,r,r",
                                  [ptrs.to(tl.int64, bitcast=True), key, col, msk.to(tl.int32)],
                                  dtype=tl.int32, is_pure=False, pack=1)
    else:
        tl.store(ptrs, (key.to(tl.int64) << 32) | col.to(tl.int64), mask=msk)


@triton.jit
def _scan_block(x_ptr, base, f0, f1, cbase, lo, scrr, wr, cap, E: tl.constexpr, T: tl.constexpr, V: tl.constexpr,
                MASKED: tl.constexpr, ASM: tl.constexpr):
    """One [E, T, V] block at flat index base (a multiple of V): the keys in [lo, key(+inf)] (lo > key(-inf):
    NaN and -inf never pass) go to scrr[wr...] as candidates, unless that passes cap. Returns wr + their count."""
    rel = (tl.arange(0, E)[:, None, None] * (T * V) + tl.arange(0, T)[None, :, None] * V
           + tl.arange(0, V)[None, None, :])
    if MASKED:
        fl = base + rel
        x = tl.load(x_ptr + fl, mask=(fl >= f0) & (fl < f1), other=float("-inf"))
    else:
        x = tl.load(x_ptr + base + rel)
    b = (x.to(tl.float32) + 0.0).to(tl.int32, bitcast=True)      # + 0.0: -0.0 -> +0.0
    key = b ^ ((b >> 31) & 0x7FFFFFFF)
    f = ((key - lo).to(tl.uint32, bitcast=True) <= (2139095040 - lo).to(tl.uint32, bitcast=True)).to(tl.int32)
    rowc = tl.sum(f, axis=2)                       # [E, T]: in-lane
    lane = tl.sum(rowc, axis=0)                    # [T]: in-lane
    tot = tl.sum(lane, axis=0)
    if (tot > 0) & (wr + tot <= cap):
        pos = (wr + (tl.cumsum(lane, axis=0) - lane)[None, :, None] + (tl.cumsum(rowc, axis=0) - rowc)[:, :, None]
               + tl.cumsum(f, axis=2) - f)
        _scatter(scrr + pos, key, cbase + rel, f != 0, ASM)
    return wr + tot


@triton.jit(do_not_specialize=["stride_r", "k", "cap"])
def _topk1_kernel(x_ptr, stride_r, starts, ends, ctr, out, scr, k, cap, E: tl.constexpr, T: tl.constexpr,
                  V: tl.constexpr, SB: tl.constexpr, NTMAX: tl.constexpr, FB: tl.constexpr, NBIN: tl.constexpr,
                  ASM: tl.constexpr):
    r = tl.program_id(0)
    st = tl.load(starts + r)
    en = tl.load(ends + r)
    L = tl.maximum(en - st, 0)
    fb = r.to(tl.int64) * stride_r
    row = x_ptr + fb
    outr = out + r.to(tl.int64) * k
    scrr = scr + r.to(tl.int64) * cap
    # 1. threshold from the sample (lo > key(-inf): the scan's range check then skips NaN and -inf)
    lo = tl.zeros([], tl.int32) - 2139095040
    sampled = L > cap
    if sampled:
        nt = tl.minimum(tl.minimum(tl.cdiv(32 * L, k * SB), L // (4 * SB)), NTMAX)
        ns = tl.maximum(nt, 1) * SB
        q = tl.maximum(tl.sqrt((k * cap).to(tl.float32)) * ns.to(tl.float32) / L.to(tl.float32), 1.0)
        tq, rem, eq, cnt = _kth(row, ns, st, L // ns, q.to(tl.int32), 0, 2, False, SB, NBIN)
        if cnt >= q.to(tl.int32):
            lo = tl.maximum(tq, lo)
    # 2. one read of the row
    BLOCK: tl.constexpr = E * T * V
    f0 = fb + st
    f1 = fb + en
    a0 = (f0 // V) * V
    nblk = tl.cdiv(tl.maximum(f1 - a0, 0), BLOCK)
    wr = tl.zeros([], tl.int32)
    if nblk > 0:
        wr = _scan_block(x_ptr, a0, f0, f1, (a0 - fb).to(tl.int32), lo, scrr, wr, cap, E, T, V, True, ASM)
    for base in range(a0 + BLOCK, a0 + (nblk - 1) * BLOCK, BLOCK):
        wr = _scan_block(x_ptr, base, f0, f1, (base - fb).to(tl.int32), lo, scrr, wr, cap, E, T, V, False, ASM)
    if nblk > 1:
        base = a0 + (nblk - 1) * BLOCK
        wr = _scan_block(x_ptr, base, f0, f1, (base - fb).to(tl.int32), lo, scrr, wr, cap, E, T, V, True, ASM)
    # 3. exact select. Unsampled rows took every valid entry; a sampled row is good when its candidates hold the
    # top k (count >= k) and fit (<= cap); otherwise the select runs over the whole row (valid count unknown).
    good = (wr <= cap) & ((sampled == 0) | (wr >= k))
    if good:
        m = _select_write(scrr, wr, st, 1, k, outr, 0, FB, NBIN)
    else:
        m = _select_write(row, L, st, 1, k, outr, 1, FB, NBIN)
    # the row's counters in the decode path's format: (count above the bracket << 32 | in it), valid count (as
    # far as known: a good sampled row only knows it is >= the candidates)
    tl.store(ctr + r * 2 + 0, tl.where(good, wr, 2147483647).to(tl.int64))
    tl.store(ctr + r * 2 + 1, tl.where(good, wr, m).to(tl.int64))
    ar = tl.arange(0, FB)
    for off in range(m, k, FB):
        tl.store(outr + off + ar, tl.full([FB], -1, tl.int32), mask=off + ar < k)
