"""The decode top-k kernels of run 59 (``topk_rows_decode`` before the 256-bin first digit), kept only so that
``benchmarks/topk_decode.py`` times them against the library's kernels in one run and checks equal sets. Delete
this file once the comparison has been measured.

Digits: d1 = key bits 31..20 (4096 bins, counted through block windows and per-entry atomics over 4 replicas),
d2 = key bits 19..8; slices start at the row's window start; the final select of a long last list is 16-ary.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from indexcache.kernels.arrival import arrive_last
from indexcache.kernels.topk.triton import (_composite, _count_bins, _pick, _row_keys, _row_window, _take_hist,
                                            _threshold_bin)

_D_NB, _D_NREP, _D_W, _D_BLOCK, _D_BLOCK2, _D_PROGS_PER_SM = 4096, 4, 32, 1024, 256, 4
_D_TB, _D_TI, _D_FB, _D_WARPS = 256, 32, 1024, 4


@triton.jit
def _select_write16(scrr, n_in, need, outp, FB: tl.constexpr, NB: tl.constexpr):
    """Write the column ids of the ``need`` largest of the n_in unique composites in scrr to outp[0:need] by a
    16-ary search (the many-programs decode path's final select when its last list is too long to rank)."""
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


@triton.jit(do_not_specialize=["stride_r", "n", "k", "slice_len"])
def _dtopk_hist_kernel(x_ptr, stride_r, n, starts, ends, hist, ctr, state, k, slice_len, BLOCK: tl.constexpr,
                       NB: tl.constexpr, NREP: tl.constexpr, W: tl.constexpr, HAS_START: tl.constexpr,
                       HAS_END: tl.constexpr):
    r = tl.program_id(0)
    p = tl.program_id(1)
    st, en = _row_window(starts, ends, r, n, HAS_START, HAS_END)
    b0 = st + p * slice_len
    b1 = tl.minimum(en, b0 + slice_len)
    row = x_ptr + r.to(tl.int64) * stride_r
    h1 = hist + r.to(tl.int64) * (2 * NREP * NB)
    ar = tl.arange(0, BLOCK)
    for off in range(b0, b1, BLOCK):
        key = _row_keys(row, off + ar, off + ar < b1)
        ok = key != -2147483648
        _count_bins(h1, tl.where(ok, (key >> 20) + 2048, 0), ok, ar, NB, NREP, W)
    if arrive_last(ctr + r * 8 + 2, tl.num_programs(1)):  # the row's last program
        h = _take_hist(h1, NB, NREP)
        m = tl.minimum(tl.sum(h, axis=0), k)
        B1, above1, n1 = _threshold_bin(h, m, tl.arange(0, NB))
        tl.store(state + r * 8 + 0, m)
        tl.store(state + r * 8 + 1, B1)
        tl.store(state + r * 8 + 2, above1)
        tl.store(state + r * 8 + 3, n1)


@triton.jit(do_not_specialize=["stride_r", "n", "k", "slice_len", "cap"])
def _dtopk_filter1_kernel(x_ptr, stride_r, n, starts, ends, hist, ctr, state, out, lists, k, slice_len, cap,
                          BLOCK: tl.constexpr, NB: tl.constexpr, NREP: tl.constexpr, W: tl.constexpr,
                          HAS_START: tl.constexpr, HAS_END: tl.constexpr):
    r = tl.program_id(0)
    p = tl.program_id(1)
    m = tl.load(state + r * 8 + 0)
    B1 = tl.load(state + r * 8 + 1)
    above1 = tl.load(state + r * 8 + 2)
    st, en = _row_window(starts, ends, r, n, HAS_START, HAS_END)
    b0 = st + p * slice_len
    b1 = tl.minimum(en, b0 + slice_len)
    row = x_ptr + r.to(tl.int64) * stride_r
    outr = out + r.to(tl.int64) * k
    l1 = lists + r.to(tl.int64) * (2 * cap)
    h2 = hist + r.to(tl.int64) * (2 * NREP * NB) + NREP * NB
    ar = tl.arange(0, BLOCK)
    for off in range(b0, b1, BLOCK):
        cols = off + ar
        key = _row_keys(row, cols, cols < b1)
        ok = key != -2147483648
        d1 = (key >> 20) + 2048
        s_hi = ok & (d1 > B1)
        s_in = ok & (d1 == B1)
        pk = s_hi.to(tl.int32) + (s_in.to(tl.int32) << 16)
        tot = tl.sum(pk, axis=0)
        if tot > 0:
            cs = tl.cumsum(pk, axis=0)
            t_in = tot >> 16
            old = tl.atomic_add(ctr + r * 8 + 0, ((tot & 0xFFFF).to(tl.int64) << 32) | t_in.to(tl.int64),
                                sem="relaxed")
            tl.store(outr + (old >> 32).to(tl.int32) + (cs & 0xFFFF) - 1, cols, mask=s_hi)
            if t_in > 0:
                tl.store(l1 + (old & 0xFFFFFFFF).to(tl.int32) + (cs >> 16) - 1, _composite(key, cols), mask=s_in)
                d2 = (key >> 8) & 0xFFF
                if t_in > 2 * W:
                    _count_bins(h2, tl.where(s_in, d2, 0), s_in, ar, NB, NREP, W)
                else:   # a few entries (the usual case): one atomic each, no block histogram
                    tl.atomic_add(h2 + (ar % NREP) * NB + d2, tl.full([BLOCK], 1, tl.int32), mask=s_in, sem="relaxed")
    if arrive_last(ctr + r * 8 + 3, tl.num_programs(1)):  # the row's last program
        h = _take_hist(h2, NB, NREP)
        B2, above2, n2 = _threshold_bin(h, m - above1, tl.arange(0, NB))
        tl.store(state + r * 8 + 4, B2)
        tl.store(state + r * 8 + 5, above1 + above2)
        tl.store(state + r * 8 + 6, n2)
        tl.store(ctr + r * 8 + 0, tl.zeros([], tl.int64))


@triton.jit(do_not_specialize=["k", "cap"])
def _dtopk_filter2_final_kernel(ctr, state, out, lists, k, cap, BLOCK: tl.constexpr, TB: tl.constexpr,
                                TI: tl.constexpr, FB: tl.constexpr):
    r = tl.program_id(0)
    p = tl.program_id(1)
    P = tl.num_programs(1)
    m = tl.load(state + r * 8 + 0)
    above1 = tl.load(state + r * 8 + 2)
    n1 = tl.load(state + r * 8 + 3)
    B2 = tl.load(state + r * 8 + 4)
    outr = out + r.to(tl.int64) * k
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
        tot = tl.sum(pk, axis=0)
        if tot > 0:
            cs = tl.cumsum(pk, axis=0)
            old = tl.atomic_add(ctr + r * 8 + 1, ((tot & 0xFFFF).to(tl.int64) << 32) | (tot >> 16).to(tl.int64),
                                sem="relaxed")
            col = (2147483647 - (comp & 2147483647)).to(tl.int32)
            tl.store(outr + above1 + (old >> 32).to(tl.int32) + (cs & 0xFFFF) - 1, col, mask=s_hi)
            tl.store(l2 + (old & 0xFFFFFFFF).to(tl.int32) + (cs >> 16) - 1, comp, mask=s_in)
    if arrive_last(ctr + r * 8 + 4, tl.num_programs(1)):  # the row's last program
        tl.store(ctr + r * 8 + 1, tl.zeros([], tl.int64))
        above = tl.load(state + r * 8 + 5)
        n2 = tl.load(state + r * 8 + 6)
        need = m - above
        if need > 0:
            if n2 <= TB:    # rank by counting: composites are unique
                aj = tl.arange(0, TB)
                ai = tl.arange(0, TI)
                cj = tl.load(l2 + aj, mask=aj < n2, other=-1, cache_modifier=".cg")
                for i0 in range(0, n2, TI):
                    ci = tl.load(l2 + i0 + ai, mask=i0 + ai < n2, other=-1, cache_modifier=".cg")
                    rank = tl.sum((cj[None, :] > ci[:, None]).to(tl.int32), axis=1)
                    col = (2147483647 - (ci & 2147483647)).to(tl.int32)
                    tl.store(outr + above + rank, col, mask=(i0 + ai < n2) & (rank < need))
            else:
                _select_write16(l2, n2, need, outr + above, FB, 16)
        af = tl.arange(0, FB)
        for off in range(m, k, FB):
            tl.store(outr + off + af, tl.full([FB], -1, tl.int32), mask=off + af < k)


class BaselineWorkspace:
    """The run-59 workspace (zeroed histograms and counters, left zeroed by the kernels)."""

    def __init__(self, rows: int, n: int, device):
        self.rows, self.n = rows, n
        self.hist = torch.zeros((rows, 2, _D_NREP, _D_NB), dtype=torch.int32, device=device)
        self.ctr = torch.zeros((rows, 8), dtype=torch.int64, device=device)
        self.state = torch.empty((rows, 8), dtype=torch.int32, device=device)
        self.lists = torch.empty((rows, 2, n), dtype=torch.int64, device=device)


def baseline_decode_launches(logits, k, row_end, ws):
    """(name, thunk) launches of the run-59 ``topk_rows_decode`` and a thunk running them that returns the output
    (CUDA only; row_end int32 [R] or None)."""
    R, N = logits.shape
    out = torch.empty((R, k), dtype=torch.int32, device=logits.device)
    ends = row_end if row_end is not None else logits
    win = dict(HAS_START=False, HAS_END=row_end is not None)
    sms = torch.cuda.get_device_properties(logits.device).multi_processor_count
    per_row = max(1, triton.cdiv(_D_PROGS_PER_SM * sms, R))
    sl = triton.cdiv(triton.cdiv(max(N, 1), per_row), _D_BLOCK) * _D_BLOCK
    P = triton.cdiv(max(N, 1), sl)
    x, s, cap = logits, logits.stride(0), ws.n
    consts = dict(NB=_D_NB, NREP=_D_NREP, W=_D_W, num_warps=_D_WARPS)

    def hist():
        _dtopk_hist_kernel[(R, P)](x, s, N, logits, ends, ws.hist, ws.ctr, ws.state, k, sl, BLOCK=_D_BLOCK, **consts,
                                   **win)

    def filter1():
        _dtopk_filter1_kernel[(R, P)](x, s, N, logits, ends, ws.hist, ws.ctr, ws.state, out, ws.lists, k, sl, cap,
                                      BLOCK=_D_BLOCK, **consts, **win)

    def filter2_final():
        _dtopk_filter2_final_kernel[(R, P)](ws.ctr, ws.state, out, ws.lists, k, cap, BLOCK=_D_BLOCK2, TB=_D_TB,
                                            TI=_D_TI, FB=_D_FB, num_warps=_D_WARPS)

    stages = [("hist", hist), ("filter1", filter1), ("filter2_final", filter2_final)]

    def run():
        for _, fn in stages:
            fn()
        return out

    return stages, run
