"""Decode top-k in Triton: one row spread over many programs by a radix select on the fp32 key.

Keys as in ``triton.py`` (order-preserving int32 of the fp32 value, -0.0 folded to +0.0, INT_MIN = never
selected). Digits of the key: d1 = bits 31..20 (4096 bins), d2 = bits 19..8 (4096 bins), then the composite
``(key - INT_MIN) << 31 | (2^31 - 1 - col)`` (lower column wins ties) settles the rest. Four launches, no host sync:

  1. hist    (R x P): each program histograms d1 of its slice, adds the non-zero bins into the row's hist1
                      (atomics, one per non-zero bin, so thousands of equal values never contend on one address).
  2. filter1 (R x P): every program finds the threshold bin B1 from hist1 (4096 bins, from L2) itself; keys with
                      d1 > B1 go to the output, d1 == B1 to list1 as composites (slots from one packed int64
                      atomic per block), and their d2 into hist2. A row with <= k valid entries takes them all.
  3. filter2 (R x P): B2 from hist2 among list1; d2 > B2 to the output, d2 == B2 to list2.
  4. final   (R):     the remaining ``need`` largest composites of list2 (usually a handful): ranked by counting
                      when list2 holds <= TB, else the 16-ary select of ``triton.py``. Pads with -1, then zeroes
                      the row's histograms and counters.

Workspace invariant: hist1, hist2 and the counters are zero between calls (allocated zeroed; launch 4 resets
them), so a CUDA graph replays the four launches with no memset. Every runtime size is ``do_not_specialize``.
"""
import triton
import triton.language as tl

from indexcache.kernels.topk.triton import _composite, _row_keys, _select_write16

INT_MIN = -2147483648


@triton.jit
def _threshold_bin(h, m, jb, take_all):
    """(B, count above B, count in B) for the bin B that holds the m-th largest (B = -1 when take_all)."""
    tot = tl.sum(h, axis=0)
    ge = tot - tl.cumsum(h, axis=0) + h                 # entries in bins >= j
    B = tl.max(tl.where(ge >= m, jb, -1), axis=0)
    B = tl.where(take_all, -1, B)
    above = tl.sum(tl.where(jb > B, h, 0), axis=0)
    n_in = tl.sum(tl.where(jb == B, h, 0), axis=0)
    return B, above, n_in


@triton.jit(do_not_specialize=["stride_r", "slice_len"])
def _dtopk_hist_kernel(x_ptr, stride_r, starts, ends, hist, slice_len, BLOCK: tl.constexpr, NB: tl.constexpr):
    r = tl.program_id(0)
    p = tl.program_id(1)
    st = tl.load(starts + r)
    en = tl.load(ends + r)
    b0 = st + p * slice_len
    b1 = tl.minimum(en, b0 + slice_len)
    if b0 < b1:
        row = x_ptr + r.to(tl.int64) * stride_r
        ar = tl.arange(0, BLOCK)
        h = tl.zeros([NB], tl.int32)
        for off in range(b0, b1, BLOCK):
            key = _row_keys(row, off + ar, off + ar < b1)
            ok = key != -2147483648
            h += tl.histogram(tl.where(ok, (key >> 20) + 2048, 0), NB, mask=ok)
        jb = tl.arange(0, NB)
        tl.atomic_add(hist + r * (2 * NB) + jb, h, mask=h > 0, sem="relaxed")


@triton.jit(do_not_specialize=["stride_r", "k", "slice_len", "cap"])
def _dtopk_filter1_kernel(x_ptr, stride_r, starts, ends, hist, ctr, state, out, lists, k, slice_len, cap,
                          BLOCK: tl.constexpr, NB: tl.constexpr, HMIN: tl.constexpr):
    r = tl.program_id(0)
    p = tl.program_id(1)
    jb = tl.arange(0, NB)
    hrow = hist + r * (2 * NB)
    h = tl.load(hrow + jb)
    nv = tl.sum(h, axis=0)
    m = tl.minimum(nv, k)
    B1, above1, n1 = _threshold_bin(h, m, jb, nv <= k)
    if p == 0:
        tl.store(state + r * 8 + 0, m)
        tl.store(state + r * 8 + 1, above1)
        tl.store(state + r * 8 + 2, n1)
    st = tl.load(starts + r)
    en = tl.load(ends + r)
    b0 = st + p * slice_len
    b1 = tl.minimum(en, b0 + slice_len)
    row = x_ptr + r.to(tl.int64) * stride_r
    outr = out + r.to(tl.int64) * k
    l1 = lists + r.to(tl.int64) * (2 * cap)
    ar = tl.arange(0, BLOCK)
    for off in range(b0, b1, BLOCK):
        cols = off + ar
        key = _row_keys(row, cols, cols < b1)
        ok = key != -2147483648
        d1 = (key >> 20) + 2048
        s_hi = ok & (d1 > B1)
        s_in = ok & (d1 == B1)
        pk = s_hi.to(tl.int32) + (s_in.to(tl.int32) << 16)
        cs = tl.cumsum(pk, axis=0)
        tot = tl.sum(pk, axis=0)
        if tot > 0:
            t_hi = tot & 0xFFFF
            t_in = tot >> 16
            old = tl.atomic_add(ctr + r * 2 + 0, (t_hi.to(tl.int64) << 32) | t_in.to(tl.int64), sem="relaxed")
            bo = (old >> 32).to(tl.int32)
            bs = (old & 0xFFFFFFFF).to(tl.int32)
            tl.store(outr + bo + (cs & 0xFFFF) - 1, cols, mask=s_hi)
            if t_in > 0:
                tl.store(l1 + bs + (cs >> 16) - 1, _composite(key, cols), mask=s_in)
                d2 = (key >> 8) & 0xFFF
                if t_in > HMIN:     # many equal bins: one atomic per non-zero bin, not per entry
                    h2 = tl.histogram(tl.where(s_in, d2, 0), NB, mask=s_in)
                    tl.atomic_add(hrow + NB + jb, h2, mask=h2 > 0, sem="relaxed")
                else:
                    tl.atomic_add(hrow + NB + d2, tl.full([BLOCK], 1, tl.int32), mask=s_in, sem="relaxed")


@triton.jit(do_not_specialize=["k", "cap"])
def _dtopk_filter2_kernel(hist, ctr, state, out, lists, k, cap, BLOCK: tl.constexpr, NB: tl.constexpr):
    r = tl.program_id(0)
    p = tl.program_id(1)
    P = tl.num_programs(1)
    m = tl.load(state + r * 8 + 0)
    above1 = tl.load(state + r * 8 + 1)
    n1 = tl.load(state + r * 8 + 2)
    if n1 > p * BLOCK:     # programs past the end of list1 skip the hist2 read (p == 0 always has work)
        jb = tl.arange(0, NB)
        h2 = tl.load(hist + r * (2 * NB) + NB + jb)
        B2, above2, n2 = _threshold_bin(h2, m - above1, jb, n1 < 0)
        if p == 0:
            tl.store(state + r * 8 + 3, above1 + above2)
            tl.store(state + r * 8 + 4, n2)
        outr = out + r.to(tl.int64) * k + above1
        l1 = lists + r.to(tl.int64) * (2 * cap)
        l2 = l1 + cap
        ar = tl.arange(0, BLOCK)
        for off in range(p * BLOCK, n1, P * BLOCK):
            msk = off + ar < n1
            comp = tl.load(l1 + off + ar, mask=msk, other=-1)
            d2 = ((comp >> 39) & 0xFFF).to(tl.int32)       # key bits 19..8 (the +2^31 leaves them alone)
            s_hi = msk & (d2 > B2)
            s_in = msk & (d2 == B2)
            pk = s_hi.to(tl.int32) + (s_in.to(tl.int32) << 16)
            cs = tl.cumsum(pk, axis=0)
            tot = tl.sum(pk, axis=0)
            if tot > 0:
                old = tl.atomic_add(ctr + r * 2 + 1, ((tot & 0xFFFF).to(tl.int64) << 32) | (tot >> 16).to(tl.int64),
                                    sem="relaxed")
                bo = (old >> 32).to(tl.int32)
                bs = (old & 0xFFFFFFFF).to(tl.int32)
                col = (2147483647 - (comp & 2147483647)).to(tl.int32)
                tl.store(outr + bo + (cs & 0xFFFF) - 1, col, mask=s_hi)
                tl.store(l2 + bs + (cs >> 16) - 1, comp, mask=s_in)
    elif p == 0:
        tl.store(state + r * 8 + 3, m)
        tl.store(state + r * 8 + 4, 0)


@triton.jit(do_not_specialize=["k", "cap"])
def _dtopk_final_kernel(hist, ctr, state, out, lists, k, cap, NB: tl.constexpr, TB: tl.constexpr,
                        TI: tl.constexpr, FB: tl.constexpr, ZB: tl.constexpr):
    r = tl.program_id(0)
    m = tl.load(state + r * 8 + 0)
    above = tl.load(state + r * 8 + 3)
    n2 = tl.load(state + r * 8 + 4)
    need = m - above
    outr = out + r.to(tl.int64) * k
    l2 = lists + r.to(tl.int64) * (2 * cap) + cap
    if need > 0:
        if n2 <= TB:    # rank by counting: composites are unique
            aj = tl.arange(0, TB)
            ai = tl.arange(0, TI)
            cj = tl.load(l2 + aj, mask=aj < n2, other=-1)
            for i0 in range(0, n2, TI):
                ci = tl.load(l2 + i0 + ai, mask=i0 + ai < n2, other=-1)
                rank = tl.sum((cj[None, :] > ci[:, None]).to(tl.int32), axis=1)
                col = (2147483647 - (ci & 2147483647)).to(tl.int32)
                tl.store(outr + above + rank, col, mask=(i0 + ai < n2) & (rank < need))
        else:
            _select_write16(l2, n2, need, outr + above, FB, 16)
    af = tl.arange(0, FB)
    for off in range(m, k, FB):
        tl.store(outr + off + af, tl.full([FB], -1, tl.int32), mask=off + af < k)
    # reset the row's workspace for the next call (launches 2 and 3 are done reading it)
    az = tl.arange(0, ZB)
    for off in range(0, 2 * NB, ZB):
        tl.store(hist + r * (2 * NB) + off + az, tl.zeros([ZB], tl.int32))
    zero = tl.zeros([], tl.int64)
    tl.store(ctr + r * 2 + 0, zero)
    tl.store(ctr + r * 2 + 1, zero)
