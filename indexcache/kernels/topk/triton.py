"""Exact per-row top-k in Triton: the decode path (sampled bracket, fused count + compact of the bracket, exact
select with an exact fallback), the one-launch prefill path (``_topk1_kernel``, the section "Prefill" below), and
the many-programs radix select of ``topk_rows_decode``.

Keys: fp32 bits mapped to an order-preserving int32 (``b`` if ``b >= 0`` else ``b ^ 0x7FFFFFFF``), -0.0 folded
to +0.0; NaN, -inf and out-of-range columns get INT_MIN and are never counted. Inside a bracket the kernel
ranks unique int64 composites ``(key - INT_MIN) << 31 | (2^31 - 1 - col)``, so among equal values the lower
column wins and the k-th element is always unique.

Decode path (R <= 64; three launches, no host sync):
  1. sample (R programs):     read ~S entries of the row, sort them, pick a bracket [lo, hi) of keys that
                              should hold the k-th largest (exact when the row has <= S entries); zero the
                              row's counters.
  2. scan   (R x C):          ONE read of the logits. Per block: keys >= hi go straight to the output, keys in
                              [lo, hi) to the row's scratch list as composites. Slots come from one relaxed
                              int64 atomic per block on the row's packed counter (count>=hi << 32 | count in
                              bracket); blocks with no candidate skip the scan and the atomic. Order does not
                              matter: the final select is exact and ties are resolved by column id. Writes
                              past k / past CAP are dropped, and then the row is flagged bad (counters keep the
                              true totals) and redone by the fallback.
  3. final  (R programs):     exact select of the remaining ``need`` among the scratch list: 256-bin histogram
                              rounds in composite space (usually one), then one write pass, then a rank count
                              among the <= TB entries of the boundary bin. If the bracket was bad (clustered
                              maxima the sample missed, heavy ties, bracket > CAP) the program redoes the row
                              alone with an exact 16-ary refinement over the full row (slow, never drops).

Prefill path (R > 64, chosen in ``ops``): ``_topk1_kernel``, described at its section below.

Many-programs decode path (``topk_rows_decode``, the ``_dtopk_*`` kernels at the end): a radix select, see there.

Every runtime size (row stride, k, CAP, chunk) is ``do_not_specialize``: the compiled variants depend only on
the constexprs (sample size, block sizes), the dtype and pointer alignment, never on R, N or the windows.
"""
import triton
import triton.language as tl

from indexcache.kernels.arrival import arrive_last


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


@triton.jit(do_not_specialize=["stride_r", "k"])
def _topk_sample_kernel(x_ptr, stride_r, starts, ends, state, ctr, k, S: tl.constexpr, RUN: tl.constexpr):
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
    zero = tl.zeros([], tl.int64)
    tl.store(ctr + r * 2 + 0, zero)
    tl.store(ctr + r * 2 + 1, zero)


@triton.jit(do_not_specialize=["stride_r", "k", "cap", "chunk"])
def _topk_scan_kernel(x_ptr, stride_r, starts, ends, state, ctr, out, scr, k, cap, chunk, BLOCK: tl.constexpr,
                      TB: tl.constexpr):
    """Fused count + compact over columns [st + c*chunk, ...) of row r; the next block is loaded ahead."""
    r = tl.program_id(0)
    c = tl.program_id(1)
    st = tl.load(starts + r)
    en = tl.load(ends + r)
    lo = tl.load(state + r * 8 + 0)
    hi = tl.load(state + r * 8 + 1)
    b0 = st + c * chunk
    b1 = tl.minimum(en, b0 + chunk)
    row = x_ptr + r.to(tl.int64) * stride_r
    outr = out + r.to(tl.int64) * k
    scrr = scr + r.to(tl.int64) * (cap + TB)
    ar = tl.arange(0, BLOCK)
    nv = tl.zeros([BLOCK], tl.int32)
    key = _row_keys(row, b0 + ar, b0 + ar < b1)
    for off in range(b0, b1, BLOCK):
        cols = off + ar
        nxt = cols + BLOCK
        key_next = _row_keys(row, nxt, nxt < b1)
        nv += (key != -2147483648).to(tl.int32)
        s_hi = key >= hi
        s_in = (key >= lo) & (key < hi)
        pk = s_hi.to(tl.int32) + (s_in.to(tl.int32) << 16)
        tot = tl.sum(pk, axis=0)
        if tot > 0:
            cs = tl.cumsum(pk, axis=0)
            n1 = (tot & 0xFFFF).to(tl.int64)
            n2 = (tot >> 16).to(tl.int64)
            old = tl.atomic_add(ctr + r * 2, (n1 << 32) | n2, sem="relaxed")
            bo = (old >> 32).to(tl.int32)
            bs = (old & 0xFFFFFFFF).to(tl.int32)
            p1 = bo + (cs & 0xFFFF) - 1
            tl.store(outr + p1, cols, mask=s_hi & (p1 < k))
            p2 = bs + (cs >> 16) - 1
            tl.store(scrr + p2, _composite(key, cols), mask=s_in & (p2 < cap))
        key = key_next
    tl.atomic_add(ctr + r * 2 + 1, tl.sum(nv, axis=0).to(tl.int64), sem="relaxed")


@triton.jit
def _pick(j, J, v):
    return tl.sum(tl.where(j == J, v, 0), axis=0)


@triton.jit
def _fallback_row(row, st, en, m, nv, outr, scrr, cap, BLOCK: tl.constexpr, NB: tl.constexpr):
    """Exact single-program path: 16-ary refinement of a composite bracket over the whole row, then compact.
    Returns (count above the bracket, count in it, bracket low, bracket high) in composite space."""
    j = tl.arange(0, NB)
    lo = tl.zeros([], tl.int64)
    hi = tl.zeros([], tl.int64) + 9223372036854775807
    chi = tl.zeros([], tl.int32)
    n_in = nv
    while n_in > cap:
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
    return chi, n_in, lo, hi


@triton.jit
def _select_write(scrr, tb, n_in, need, outp, a, b, FB: tl.constexpr, NBIN: tl.constexpr, TB: tl.constexpr,
                  TI: tl.constexpr):
    """Write the column ids of the ``need`` largest of the n_in unique composites in scrr (all in [a, b)) to
    outp[0:need]. Histogram rounds narrow [a, b) until its boundary bin holds <= TB entries; those go to the tie
    buffer ``tb`` and are ranked by counting."""
    ar = tl.arange(0, FB)
    jb = tl.arange(0, NBIN)
    above = tl.zeros([], tl.int32)      # entries >= b
    cb = n_in                           # entries in [a, b)
    if need >= n_in:
        b = a
        above = n_in
        cb = 0
    while cb > TB:
        w = b - a
        shift = tl.zeros([], tl.int64)
        while (w >> shift) >= NBIN:
            shift += 1
        h = tl.zeros([NBIN], tl.int32)
        for off in range(0, n_in, FB):
            cv = tl.load(scrr + off + ar, mask=off + ar < n_in, other=-1)
            inr = (off + ar < n_in) & (cv >= a) & (cv < b)
            bn = tl.where(inr, (cv - a) >> shift, 0).to(tl.int32)
            h += tl.histogram(bn, NBIN, mask=inr)
        ge = cb - tl.cumsum(h, axis=0) + h             # entries in [a, b) with bin >= j
        need_r = need - above
        J = tl.max(tl.where(ge >= need_r, jb, -1), axis=0)
        hJ = _pick(jb, J, h)
        above += _pick(jb, J, ge) - hJ
        cb = hJ
        last = J.to(tl.int64) >= ((w - 1) >> shift)   # the top bin keeps b (no overflow near INT64_MAX)
        b = tl.where(last, b, a + ((J.to(tl.int64) + 1) << shift))
        a = a + (J.to(tl.int64) << shift)
    # one write pass: >= b straight out, [a, b) to the tie buffer
    bo = tl.zeros([], tl.int32)
    bs = tl.zeros([], tl.int32)
    for off in range(0, n_in, FB):
        cv = tl.load(scrr + off + ar, mask=off + ar < n_in, other=-1)
        s_hi = cv >= b
        s_in = (cv >= a) & (cv < b)
        pk = s_hi.to(tl.int32) + (s_in.to(tl.int32) << 16)
        cs = tl.cumsum(pk, axis=0)
        col = (2147483647 - (cv & 2147483647)).to(tl.int32)
        tl.store(outp + bo + (cs & 0xFFFF) - 1, col, mask=s_hi)
        tl.store(tb + bs + (cs >> 16) - 1, cv, mask=s_in)
        tot = tl.sum(pk, axis=0)
        bo += tot & 0xFFFF
        bs += tot >> 16
    need_r = need - above
    ai = tl.arange(0, TI)
    aj = tl.arange(0, TB)
    cj = tl.load(tb + aj, mask=aj < cb, other=-1)
    for i0 in range(0, cb, TI):
        ci = tl.load(tb + i0 + ai, mask=i0 + ai < cb, other=-1)
        rank = tl.sum((cj[None, :] > ci[:, None]).to(tl.int32), axis=1)
        colt = (2147483647 - (ci & 2147483647)).to(tl.int32)
        tl.store(outp + above + rank, colt, mask=(i0 + ai < cb) & (rank < need_r))


@triton.jit(do_not_specialize=["stride_r", "k", "cap"])
def _topk_final_kernel(x_ptr, stride_r, starts, ends, state, ctr, out, scr, k, cap, BLOCK: tl.constexpr,
                       FB: tl.constexpr, NB: tl.constexpr, NBIN: tl.constexpr, TB: tl.constexpr,
                       TI: tl.constexpr):
    r = tl.program_id(0)
    st = tl.load(starts + r)
    en = tl.load(ends + r)
    lo = tl.load(state + r * 8 + 0)
    hi = tl.load(state + r * 8 + 1)
    pk = tl.load(ctr + r * 2 + 0)
    nv = tl.load(ctr + r * 2 + 1).to(tl.int32)
    chi = (pk >> 32).to(tl.int32)
    n_in = (pk & 0xFFFFFFFF).to(tl.int32)
    m = tl.minimum(nv, k)
    good = (m > 0) & (chi < m) & (chi + n_in >= m) & (n_in <= cap)
    outr = out + r.to(tl.int64) * k
    scrr = scr + r.to(tl.int64) * (cap + TB)
    if m > 0:
        a = (lo.to(tl.int64) + 2147483648) << 31
        b = (hi.to(tl.int64) + 2147483648) << 31
        if good == 0:
            row = x_ptr + r.to(tl.int64) * stride_r
            chi, n_in, a, b = _fallback_row(row, st, en, m, nv, outr, scrr, cap, BLOCK, NB)
        _select_write(scrr, scrr + cap, n_in, m - chi, outr + chi, a, b, FB, NBIN, TB, TI)
    ar = tl.arange(0, FB)
    for off in range(m, k, FB):
        tl.store(outr + off + ar, tl.full([FB], -1, tl.int32), mask=off + ar < k)


# ---------------------------------------------------------------------------------------------------------------
# Decode over many programs per row (``topk_rows_decode``): a radix select on the key of ``_row_keys``.
# Digits: d1 = key bits 31..24 (256 bins: sign and the top 7 exponent bits), d2 = bits 23..12 (4096 bins); the
# composite of ``_composite`` settles the rest. Three launches, each over (R x P) programs; program p reads the
# columns [p * slice, (p + 1) * slice) of the row and masks them by the row's window afterwards (its loads do not
# wait for the window bounds). The LAST program of a row to finish a launch (an acq_rel arrival counter) does the
# row's serial step, so the next launch reads a few scalars instead of a histogram:
#   1. hist:    d1 of the slice through one 256-bin tl.histogram per block, summed over the slice in registers,
#               then one atomic per non-empty bin into the row's hist1; last: hist1 -> threshold bin B1 (state).
#   2. filter1: d1 > B1 to the output, d1 == B1 to list1 (composites; slots from one packed int64 atomic per
#               block) with their d2 into hist2; last: hist2 -> B2 among list1 (state).
#   3. filter2: list1 strided over the programs: d2 > B2 to the output, d2 == B2 to list2; last: the final
#               select of the remaining ``need`` in list2 (its entries share key bits 31..12): rank by counting up
#               to TB entries, else 256-bin histogram rounds (``_select_write``), then -1 padding.
# Why 256 bins for d1: the hist launch is latency-bound (a 200K row is 0.8 MB). A 4096-bin digit cannot go through
# one tl.histogram (~NB/32 instructions per entry and lane), so its blocks counted windows of bins plus one atomic
# per entry outside them, and a bell-shaped row sent tens of thousands of atomics to a few hot bins, then one
# program scanned 4 x 4096 bins. 256 bins take one cheap tl.histogram, ~16 atomics per program and a 256-bin scan;
# the price is a wider threshold bin (list1 ~2% of a Gaussian row instead of ~0.6%), which filter1 and filter2
# write and read in parallel.
# Counting list1's d2 (filter1) keeps the windows: tl.histogram costs ~NB/32 instructions per entry and lane
# (4096 bins: ~2000), and one atomic per entry piles atomics onto the few hot bins of a narrow row. So a block
# with many list1 entries counts three windows of bins where its mass sits (its top W and bottom W bins; the 2W
# around its mean bin: the middle of a narrow bell, a heavy bin of ties) with one 4W-bin tl.histogram and adds the
# non-zero bins with one atomic each; entries outside the windows take one atomic each, spread over NREP replicas.
# Workspace invariant: histograms and counters are zero between calls (each last program zeroes what its launch
# used), so a CUDA graph replays the three launches with no memset.


@triton.jit
def _count_bins(hbase, bins, msk, lane, NB: tl.constexpr, NREP: tl.constexpr, W: tl.constexpr):
    """Add the masked entries of ``bins`` (in [0, NB)) to the replicated histogram ``hbase`` [NREP, NB]: the
    block's top W bins, bottom W bins and the 2W bins around its mean bin through one 4W-bin tl.histogram and an
    atomic per non-zero bin; the rest (if any) with one atomic per entry on replica lane % NREP."""
    lo = tl.min(tl.where(msk, bins, NB), axis=0)
    hi = tl.max(tl.where(msk, bins, -1), axis=0)
    if hi >= 0:
        c = tl.sum(tl.where(msk, bins, 0), axis=0) // tl.sum(msk.to(tl.int32), axis=0)
        top = msk & (bins > hi - W)
        bot = msk & (bins < lo + W) & (top == 0)
        mid = msk & (bins >= c - W) & (bins < c + W) & (top == 0) & (bot == 0)
        wb = tl.where(top, bins - hi + (4 * W - 1), tl.where(bot, bins - lo, tl.where(mid, bins - c + 2 * W, 0)))
        h = tl.histogram(wb, 4 * W, mask=top | bot | mid)
        j = tl.arange(0, 4 * W)
        tgt = tl.where(j >= 3 * W, hi - (4 * W - 1) + j, tl.where(j < W, lo + j, c - 2 * W + j))
        tl.atomic_add(hbase + tgt, h, mask=h > 0, sem="relaxed")
        rest = msk & (top == 0) & (bot == 0) & (mid == 0)
        if tl.sum(rest.to(tl.int32), axis=0) > 0:
            tl.atomic_add(hbase + (lane % NREP) * NB + bins, tl.full(bins.shape, 1, tl.int32), mask=rest,
                          sem="relaxed")


@triton.jit
def _take_hist(hbase, NB: tl.constexpr, NREP: tl.constexpr):
    """The sum of the NREP replicas at ``hbase``, which are left zeroed (L2 reads: other programs' atomics)."""
    jb = tl.arange(0, NB)
    h = tl.zeros([NB], tl.int32)
    for i in tl.static_range(NREP):
        h += tl.load(hbase + i * NB + jb, cache_modifier=".cg")
        tl.store(hbase + i * NB + jb, tl.zeros([NB], tl.int32))
    return h


@triton.jit
def _threshold_bin(h, m, jb):
    """(B, count above B, count in B) for the bin B that holds the m-th largest; B = -1 when m == 0 or m is all
    of h (take everything)."""
    tot = tl.sum(h, axis=0)
    ge = tot - tl.cumsum(h, axis=0) + h                 # entries in bins >= j
    B = tl.max(tl.where(ge >= m, jb, -1), axis=0)
    B = tl.where((m <= 0) | (m >= tot), -1, B)
    above = tl.sum(tl.where(jb > B, h, 0), axis=0)
    n_in = tl.sum(tl.where(jb == B, h, 0), axis=0)
    return B, above, n_in


@triton.jit
def _row_window(starts, ends, r, n, HAS_START: tl.constexpr, HAS_END: tl.constexpr):
    """Row r's column window [st, en), each bound clamped to [0, n]; absent bounds are 0 and n. Read and clamped
    here, not by torch ops before the launch: in a graph replay each of those is a kernel of its own (~1 us)."""
    st = n * 0
    en = n
    if HAS_START:
        st = tl.minimum(tl.maximum(tl.load(starts + r), 0), n)
    if HAS_END:
        en = tl.minimum(tl.maximum(tl.load(ends + r), 0), n)
    return st, en


@triton.jit
def _slice_keys(row, cols, b1, st, en):
    """Keys of the slice columns cols (< b1) of the row: the load is masked by the slice only, the window [st, en)
    applies afterwards, so the load does not wait for the bounds' load."""
    key = _row_keys(row, cols, cols < b1)
    return tl.where((cols >= st) & (cols < en), key, -2147483648)


@triton.jit(do_not_specialize=["stride_r", "n", "k", "slice_len"])
def _dtopk_hist_kernel(x_ptr, stride_r, n, starts, ends, hist, ctr, state, k, slice_len, BLOCK: tl.constexpr,
                       NB1: tl.constexpr, HROW: tl.constexpr, HAS_START: tl.constexpr, HAS_END: tl.constexpr):
    r = tl.program_id(0)
    p = tl.program_id(1)
    b0 = p * slice_len
    b1 = tl.minimum(n, b0 + slice_len)
    st, en = _row_window(starts, ends, r, n, HAS_START, HAS_END)
    row = x_ptr + r.to(tl.int64) * stride_r
    h1 = hist + r.to(tl.int64) * HROW
    ar = tl.arange(0, BLOCK)
    jb = tl.arange(0, NB1)
    h = tl.zeros([NB1], tl.int32)
    for off in range(b0, b1, BLOCK):
        key = _slice_keys(row, off + ar, b1, st, en)
        ok = key != -2147483648
        h += tl.histogram(tl.where(ok, (key >> 24) + 128, 0), NB1, mask=ok)
    tl.atomic_add(h1 + jb, h, mask=h > 0, sem="relaxed")
    if arrive_last(ctr + r * 8 + 2, tl.num_programs(1)):  # the row's last program
        h = tl.load(h1 + jb, cache_modifier=".cg")      # L2: other programs' atomics
        tl.store(h1 + jb, tl.zeros([NB1], tl.int32))
        m = tl.minimum(tl.sum(h, axis=0), k)
        B1, above1, n1 = _threshold_bin(h, m, jb)
        tl.store(state + r * 8 + 0, m)
        tl.store(state + r * 8 + 1, B1)
        tl.store(state + r * 8 + 2, above1)
        tl.store(state + r * 8 + 3, n1)


@triton.jit(do_not_specialize=["stride_r", "n", "k", "slice_len", "cap"])
def _dtopk_filter1_kernel(x_ptr, stride_r, n, starts, ends, hist, ctr, state, out, lists, k, slice_len, cap,
                          BLOCK: tl.constexpr, NB1: tl.constexpr, HROW: tl.constexpr, NB: tl.constexpr,
                          NREP: tl.constexpr, W: tl.constexpr, HAS_START: tl.constexpr, HAS_END: tl.constexpr):
    r = tl.program_id(0)
    p = tl.program_id(1)
    b0 = p * slice_len
    b1 = tl.minimum(n, b0 + slice_len)
    m = tl.load(state + r * 8 + 0)
    B1 = tl.load(state + r * 8 + 1)
    above1 = tl.load(state + r * 8 + 2)
    st, en = _row_window(starts, ends, r, n, HAS_START, HAS_END)
    row = x_ptr + r.to(tl.int64) * stride_r
    outr = out + r.to(tl.int64) * k
    l1 = lists + r.to(tl.int64) * (2 * cap)
    h2 = hist + r.to(tl.int64) * HROW + NB1
    ar = tl.arange(0, BLOCK)
    for off in range(b0, b1, BLOCK):
        cols = off + ar
        key = _slice_keys(row, cols, b1, st, en)
        ok = key != -2147483648
        d1 = (key >> 24) + 128
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
                d2 = (key >> 12) & 0xFFF
                if t_in > 2 * W:
                    _count_bins(h2, tl.where(s_in, d2, 0), s_in, ar, NB, NREP, W)
                else:   # a few entries: one atomic each, no block histogram
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
                                TI: tl.constexpr, FB: tl.constexpr, NBIN: tl.constexpr):
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
        d2 = ((comp >> 43) & 0xFFF).to(tl.int32)       # key bits 23..12 (the +2^31 leaves them alone)
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
            else:   # list2's keys share bits 31..12: its composites lie in [a, b); list1 (read) is the tie buffer
                B1 = tl.load(state + r * 8 + 1)
                pre = ((B1 - 128).to(tl.int64) << 12) + B2      # key >> 12 of every list2 entry
                a = ((pre << 12) + 2147483648) << 31
                b = (((pre + 1) << 12) + 2147483648) << 31      # < 2^63: valid keys stay below key(NaN) - 4096
                _select_write(l2, l1, n2, need, outr + above, a, b, FB, NBIN, TB, TI)
        af = tl.arange(0, FB)
        for off in range(m, k, FB):
            tl.store(outr + off + af, tl.full([FB], -1, tl.int32), mask=off + af < k)


# ------------------------------------------------------------------------------------- prefill: one launch
# Prefill top-k in one launch (``topk_rows(..., _path="one")``): one program per row reads the row once.
#
# Per row r (columns [st, en), m = min(valid entries, k)); programs take the rows last first (in a causal chunk
# the longest rows start first and the short ones fill the tail):
#   1. threshold: a stratified sample of ns entries (one per stride of L // ns, at a hashed offset in the stride;
#      ns ~ 32 L / k, so about 32 samples fall in the top k whatever L is). ``lo`` = the sample's rank-q key with
#      q ~ ns * sqrt(k * CAP) / L, so count(key >= lo) ~ sqrt(k * CAP): 2k at CAP = 4k, ~6 sd from both m and CAP.
#      A sample of up to 4 tiles (rows to ~256K at k = 2048) is gathered once into registers and its histogram
#      rounds run there; a longer one is re-read per round. Rows of <= CAP entries skip the sample and the scan.
#   2. scan: ONE read of the row, 16-byte vector loads from the aligned-down start (only the first and last block
#      are masked; each middle block's load is issued before the previous block is filtered). Entries with
#      key >= lo go to the row's scratch as int64 ``key << 32 | col``. Slots: per block
#      the [E, T, V] tile (T lanes, V contiguous entries per lane) counts its candidates per lane in registers, one
#      exclusive cumsum over the T lane counts gives the lane's base, and the in-lane ranks are register cumsums:
#      no atomics, no scan over the whole block. Blocks that would pass CAP store nothing (the row is then bad).
#   3. select (same program): the exact m-th largest key by 64-bin ``tl.histogram`` rounds over the candidates
#      (4096-entry tiles: one or two per round); if the ties at that key are more than needed, the same select on
#      the columns of the tied entries picks the lowest columns; one write pass. Rows of <= CAP entries, and bad
#      rows (count(>= lo) < k or > CAP: maxima the sample missed, heavy ties), run the same select over the row
#      itself (a bad row: a few more reads of it). Then -1 padding.
#
# Keys: the order-preserving int32 of ``_row_keys`` (-0.0 folded to +0.0; NaN / -inf -> INT_MIN, never
# selected). Every runtime size is ``do_not_specialize``: one compiled variant per dtype and alignment.
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
    """(key, col, ok) of items [off, off + FB) of a source of n items. SRC 0: candidates ``fp32 bits << 32 | col``
    at src (``_row_store``: valid values, no NaN, no -inf); 1: the row at src, columns st + i; 2: the row's
    sample, column st + i * stride + hashed jitter."""
    i = off + tl.arange(0, FB)
    msk = i < n
    if SRC == 0:
        c = tl.load(src + i, mask=msk, other=0)
        key = _keys_of((c >> 32).to(tl.int32).to(tl.float32, bitcast=True))
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
def _round_shift(w, NBIN: tl.constexpr):
    """Bits per bin of a histogram round over a range of w values: the least shift with (w - 1) >> shift < NBIN."""
    shift = tl.zeros([], tl.int64)
    while ((w - 1) >> shift) >= NBIN:
        shift += 1
    return shift


@triton.jit
def _narrow(h, jb, rem, P, w, shift):
    """One round of ``_kth``'s histogram select: from the round's histogram h of (v - P) >> shift over the range
    [P, P + w), the bin J that holds the rem-th largest; returns the narrowed (P, rem, w), eq (the items in J)
    and whether another round is needed (jb: the bin ids, tl.arange(0, NBIN))."""
    ge = tl.sum(h, axis=0) - tl.cumsum(h, axis=0) + h      # items in range with bin >= j
    J = tl.max(tl.where(ge >= rem, jb, -1), axis=0)
    hJ = tl.sum(tl.where(jb == J, h, 0), axis=0)
    rem -= tl.sum(tl.where(jb == J, ge, 0), axis=0) - hJ
    P = P + (J.to(tl.int64) << shift).to(tl.int32)
    w = tl.minimum(w - (J.to(tl.int64) << shift), tl.zeros([], tl.int64) + 1 << shift)
    return P, rem, w, hJ, (hJ != rem) & (w > 1)


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
        shift = _round_shift(w, NBIN)
        w32 = w.to(tl.uint32)
        sh32 = shift.to(tl.uint32)
        h = tl.zeros([NBIN], tl.int32)
        for off in range(0, n, FB):
            v, ok, key, col = _vals(src, off, n, st, stride, tkey, SRC, BY_COL, FB)
            d = (v - P).to(tl.uint32, bitcast=True)
            inr = ok & (d < w32)
            h += tl.histogram(tl.where(inr, d >> sh32, 0).to(tl.int32), NBIN, mask=inr)
        P, rem, w, eq, busy = _narrow(h, jb, rem, P, w, shift)
    return P, rem, eq, cnt


@triton.jit
def _select_write1(src, n, st, stride, need, outr, SRC: tl.constexpr, FB: tl.constexpr, NBIN: tl.constexpr):
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
def _warp_scan(c, ASM: tl.constexpr):
    """(exclusive prefix of c over the lanes of each warp, the warp's total, the warp's index) for c [T] with one
    element a thread (T = 32 * warps). ASM (compiled code): shuffles over the physical lanes, so no value crosses a
    warp (no shared memory, no CTA barrier); the slots built from it are unique whatever the element-to-lane map,
    as each warp's elements are counted by that warp alone. Otherwise (interpreter): element t in warp t // 32."""
    T: tl.constexpr = c.shape[0]
    if ASM:
        ex, tot, wid = tl.inline_asm_elementwise(
            "{ .reg .b32 s, t; .reg .pred p; mov.b32 s, $3; "
            "shfl.sync.up.b32 t|p, s, 1, 0, 0xffffffff; @p add.s32 s, s, t; "
            "shfl.sync.up.b32 t|p, s, 2, 0, 0xffffffff; @p add.s32 s, s, t; "
            "shfl.sync.up.b32 t|p, s, 4, 0, 0xffffffff; @p add.s32 s, s, t; "
            "shfl.sync.up.b32 t|p, s, 8, 0, 0xffffffff; @p add.s32 s, s, t; "
            "shfl.sync.up.b32 t|p, s, 16, 0, 0xffffffff; @p add.s32 s, s, t; "
            "sub.s32 $0, s, $3; shfl.sync.idx.b32 $1, s, 31, 31, 0xffffffff; "
            "mov.u32 t, %tid.x; shr.u32 $2, t, 5; }",
            "=r,=r,=r,r", [c], dtype=(tl.int32, tl.int32, tl.int32), is_pure=True, pack=1)
    else:
        NW: tl.constexpr = T // 32
        cw = tl.reshape(c, [NW, 32])
        ex = tl.reshape(tl.cumsum(cw, axis=1) - cw, [T])
        tot = tl.reshape(tl.zeros([NW, 32], tl.int32) + tl.sum(cw, axis=1)[:, None], [T])
        wid = tl.arange(0, T) // 32
    return ex, tot, wid


def _count_asm(v: int) -> str:
    """PTX for ``_row_counts`` (pack = v): the count of x >= lof in output 0, zeros in the others."""
    body = "".join(f"mov.b32 x, ${v + j}; setp.ge.f32 p, x, l; @p add.s32 n, n, 1; " for j in range(v))
    zeros = "".join(f"mov.b32 ${j}, 0; " for j in range(1, v))
    return ("{ .reg .pred p; .reg .f32 x, l; .reg .b32 n; mov.b32 l, $" + str(2 * v) + "; mov.b32 n, 0; " + body
            + "mov.b32 $0, n; " + zeros + "}")


def _store_asm(v: int) -> str:
    """PTX for ``_row_store`` (pack = v; operands: v outputs, then v each of slot, x bits, lof bits, scratch
    pointer, column): the address once a row, then a predicated 8-byte step an entry that passes."""
    body = "".join(f"mov.b32 x, ${2 * v + j}; setp.ge.f32 p, x, l; add.s32 c, ${5 * v}, {j}; "
                   f"@p st.global.v2.b32 [a], {{c, ${2 * v + j}}}; @p add.s64 a, a, 8; " for j in range(v))
    zeros = "".join(f"mov.b32 ${j}, 0; " for j in range(v))
    return ("{ .reg .pred p; .reg .f32 x, l; .reg .b32 c; .reg .b64 a; mov.b32 l, $" + str(3 * v)
            + "; mad.wide.u32 a, $" + str(v) + ", 8, $" + str(4 * v) + "; " + body + zeros + "}")


_COUNT4: tl.constexpr = tl.constexpr(_count_asm(4))
_COUNT8: tl.constexpr = tl.constexpr(_count_asm(8))
_COUNT4_C: tl.constexpr = tl.constexpr(",".join(["=r"] * 4 + ["r"] * 8))
_COUNT8_C: tl.constexpr = tl.constexpr(",".join(["=r"] * 8 + ["r"] * 16))
_STORE4: tl.constexpr = tl.constexpr(_store_asm(4))
_STORE8: tl.constexpr = tl.constexpr(_store_asm(8))
_STORE4_C: tl.constexpr = tl.constexpr(",".join(["=r"] * 4 + ["r"] * 12 + ["l"] * 4 + ["r"] * 4))
_STORE8_C: tl.constexpr = tl.constexpr(",".join(["=r"] * 8 + ["r"] * 24 + ["l"] * 8 + ["r"] * 8))


@triton.jit
def _row_counts(xb, lofb, V: tl.constexpr, ASM: tl.constexpr):
    """[R, V] int32 with each row's count of entries >= lof in its column 0 (zeros elsewhere); xb, lofb: fp32
    bits. ASM: a float compare and a predicated add an entry (the compiler's own code for a sum of compares
    packed the booleans into bit fields first, several times the instructions)."""
    if ASM:
        if V == 4:
            c = tl.inline_asm_elementwise(_COUNT4, _COUNT4_C, [xb, lofb], dtype=tl.int32, is_pure=True, pack=4)
        else:
            c = tl.inline_asm_elementwise(_COUNT8, _COUNT8_C, [xb, lofb], dtype=tl.int32, is_pure=True, pack=8)
    else:
        f = (xb.to(tl.float32, bitcast=True) >= lofb.to(tl.float32, bitcast=True)).to(tl.int32)
        c = tl.where(tl.arange(0, V)[None, :] == 0, tl.sum(f, axis=1)[:, None], 0)
    return c


@triton.jit
def _row_store(xb, lofb, slot, col, scrr, V: tl.constexpr, ASM: tl.constexpr):
    """Each row's entries >= lof (xb, lofb: fp32 bits) to scrr[slot ...] in order as ``bits << 32 | col`` (slot,
    col: per row, repeated over the row's V entries; col is the row's first column). ASM: a float compare, an
    address, a predicated 8-byte store and a predicated increment an entry, from the registers the entries are
    in (``tl.store`` of scattered addresses would first move pointers, values and masks through shared memory
    into a layout of its own, one entry a lane, which costs more than the scan)."""
    if ASM:
        if V == 4:
            tl.inline_asm_elementwise(_STORE4, _STORE4_C, [slot, xb, lofb, scrr, col], dtype=tl.int32,
                                      is_pure=False, pack=4)
        else:
            tl.inline_asm_elementwise(_STORE8, _STORE8_C, [slot, xb, lofb, scrr, col], dtype=tl.int32,
                                      is_pure=False, pack=8)
    else:
        f = (xb.to(tl.float32, bitcast=True) >= lofb.to(tl.float32, bitcast=True)).to(tl.int32)
        pos = slot + tl.cumsum(f, axis=1) - f
        c = col + tl.arange(0, V)[None, :]
        tl.store(scrr + pos, (xb.to(tl.int64) << 32) | (c.to(tl.int64) & 0xFFFFFFFF), mask=f != 0)


@triton.jit
def _scan_rel(E: tl.constexpr, T: tl.constexpr, V: tl.constexpr):
    """Flat offsets of an [E * T, V] block: row i holds the V contiguous entries from i * V."""
    return tl.arange(0, E * T)[:, None] * V + tl.arange(0, V)[None, :]


@triton.jit
def _scan_x(x, cbase, lof, scrr, run, rcw, E: tl.constexpr, T: tl.constexpr, V: tl.constexpr, ASM: tl.constexpr):
    """The entries >= lof of one block x [E * T, V] (column cbase + offset) to the candidates: a region of rcw
    scratch slots per warp (CTA-wide slots took a cumsum over the program and several CTA barriers a block, which
    bounded the scan: run 122 timed the two forms, 1.21-1.26x). Element t of the [T] tensors goes with rows
    e * T + t. An entry's slot is its warp's region + the warp's running count (``run`` [T], carried over the
    blocks) + the counts of the lanes before it in the warp + its thread's earlier entries, so nothing crosses a
    warp (``_warp_scan``). The test is a float compare against lof (the float of the key lo: NaN and -inf never
    pass, -0.0 >= +0.0). A thread whose entries would pass its region's end stores none of them (its warp's count
    still grows: the row is then bad). Candidates are stored as fp32 bits (the select makes the keys). Returns run
    and the warp index of each element of the [T] tensors."""
    xb = x.to(tl.float32).to(tl.int32, bitcast=True)
    lofb = lof.to(tl.int32, bitcast=True)
    rc = tl.reshape(tl.sum(_row_counts(xb, lofb + tl.zeros_like(xb), V, ASM), axis=1), [E, T])   # in-thread
    tc = tl.sum(rc, axis=0)                        # per thread
    ex, tot, wid = _warp_scan(tc, ASM)
    at = run + ex                                  # the thread's first slot in its warp's region
    run += tot
    # a thread that would pass its region's end stores nothing: its threshold becomes NaN (no entry passes)
    lt = tl.where(at + tc <= rcw, lofb, 0x7FC00000)
    rs = tl.reshape((wid * rcw + at)[None, :] + tl.cumsum(rc, axis=0) - rc, [E * T])
    lr = tl.reshape(tl.zeros([E, T], tl.int32) + lt[None, :], [E * T])
    zero = tl.zeros([E * T, V], tl.int32)
    col = cbase + tl.arange(0, E * T) * V
    _row_store(xb, lr[:, None] + zero, rs[:, None] + zero, col[:, None] + zero, scrr + zero, V, ASM)
    return run, wid


@triton.jit
def _scan_block(x_ptr, base, f0, f1, cbase, lof, scrr, run, rcw, E: tl.constexpr, T: tl.constexpr, V: tl.constexpr,
                MASKED: tl.constexpr, ASM: tl.constexpr):
    """``_scan_x`` of the [E * T, V] block at flat index base (a multiple of V); MASKED: only flat [f0, f1)."""
    rel = _scan_rel(E, T, V)
    if MASKED:
        fl = base + rel
        x = tl.load(x_ptr + fl, mask=(fl >= f0) & (fl < f1), other=float("-inf"))
    else:
        x = tl.load(x_ptr + base + rel)
    return _scan_x(x, cbase, lof, scrr, run, rcw, E, T, V, ASM)


@triton.jit
def _gather_regions(scrr, kept, rcw, NW: tl.constexpr, FB: tl.constexpr):
    """Moves the per-warp regions' candidates (kept[w] <= rcw in region w) into one list at scrr[0 ...): region w
    goes to the sum of the earlier regions' counts, never above its own start, so moving the regions in order,
    each chunk loaded before any of it is stored, overwrites only what has already moved."""
    w_ids = tl.arange(0, NW)
    dst = tl.cumsum(kept, axis=0) - kept
    i = tl.arange(0, FB)
    for w in tl.static_range(1, NW):
        n = tl.sum(tl.where(w_ids == w, kept, 0), axis=0)
        d = tl.sum(tl.where(w_ids == w, dst, 0), axis=0)
        for c in range(0, n, FB):
            m = c + i < n
            v = tl.load(scrr + w * rcw + c + i, mask=m)
            tl.debug_barrier()
            tl.store(scrr + d + c + i, v, mask=m)
            tl.debug_barrier()


@triton.jit
def _kth_r(v, ok, need, NBIN: tl.constexpr):
    """``_kth`` over a tile held in registers (v where ok): the same histogram rounds with no re-reads."""
    cnt = tl.sum(ok.to(tl.int32), axis=0)
    vmin = tl.min(tl.where(ok, v, 2147483647), axis=0)
    vmax = tl.max(tl.where(ok, v, -2147483648), axis=0)
    rem = tl.minimum(need, cnt)
    P = vmin
    w = vmax.to(tl.int64) - vmin.to(tl.int64) + 1          # width of the range that holds the rem-th
    eq = rem
    busy = (rem > 0) & (rem < cnt)
    jb = tl.arange(0, NBIN)
    while busy:
        shift = _round_shift(w, NBIN)
        d = (v - P).to(tl.uint32, bitcast=True)
        inr = ok & (d < w.to(tl.uint32))
        h = tl.histogram(tl.where(inr, d >> shift.to(tl.uint32), 0).to(tl.int32), NBIN, mask=inr)
        P, rem, w, eq, busy = _narrow(h, jb, rem, P, w, shift)
    return P, rem, eq, cnt


@triton.jit
def _sample_lo(row, st, L, ns, q, S: tl.constexpr, NBIN: tl.constexpr):
    """The key of rank q among the ns <= S sample entries of the row (one per stride of L // ns, at a hashed
    offset in the stride), held in registers: one gather, then histogram rounds with no re-reads; and how many
    valid entries the sample holds."""
    i = tl.arange(0, S)
    stride = L // ns
    col = st + i * stride + ((i * 40503) & 0xFFFF) % stride
    key = _keys_of(tl.load(row + col, mask=i < ns, other=float("-inf")))
    tq, rem, eq, cnt = _kth_r(key, key != -2147483648, q, NBIN)
    return tq, cnt


@triton.jit(do_not_specialize=["stride_r", "k", "cap", "stride_o", "k2"])
def _topk1_kernel(x_ptr, stride_r, starts, ends, ctr, out, scr, k, cap, stride_o, out2, k2, E: tl.constexpr,
                  T: tl.constexpr, V: tl.constexpr, SB: tl.constexpr, NTMAX: tl.constexpr, FB: tl.constexpr,
                  NBIN: tl.constexpr, ASM: tl.constexpr, TWO: tl.constexpr):
    """Row r's k largest columns to out[r, :k] (row stride stride_o). TWO: also its k2 <= k largest to
    out2[r, :k2] (same row stride), selected from the same candidates: they hold the top k, so the top k2 and
    every tie at the k2-th value too; one read of the row serves both."""
    # the last rows first: the rows of a causal chunk grow with their index, so the longest start first and the
    # shortest fill the tail
    r = tl.num_programs(0) - 1 - tl.program_id(0)
    st = tl.load(starts + r)
    en = tl.load(ends + r)
    L = tl.maximum(en - st, 0)
    fb = r.to(tl.int64) * stride_r
    row = x_ptr + fb
    outr = out + r.to(tl.int64) * stride_o
    scrr = scr + r.to(tl.int64) * cap
    # 1. threshold from the sample (lo > key(-inf): the scan's range check then skips NaN and -inf); the sample
    # of up to 4 tiles (rows up to ~256K at k = 2048) sits in registers, a longer one is re-read per round
    lo = tl.zeros([], tl.int32) - 2139095040
    sampled = L > cap
    if sampled:
        nt = tl.minimum(tl.minimum(tl.cdiv(32 * L, k * SB), L // (4 * SB)), NTMAX)
        ns = tl.maximum(nt, 1) * SB
        q = tl.maximum(tl.sqrt((k * cap).to(tl.float32)) * ns.to(tl.float32) / L.to(tl.float32), 1.0)
        qi = q.to(tl.int32)
        if ns <= 4 * SB:
            tq, cnt = _sample_lo(row, st, L, ns, qi, 4 * SB, NBIN)
        else:
            tq, rem, eq, cnt = _kth(row, ns, st, L // ns, qi, 0, 2, False, SB, NBIN)
        if cnt >= qi:
            lo = tl.maximum(tq, lo)
    # 2. one read of a sampled row (no blocks for the others): the masked first and last blocks, the middle ones
    # unmasked with the next block's load issued before the current block is filtered (two blocks in flight).
    # Each warp appends to its own region of cap / warps slots, so no step of the scan crosses a warp; the regions
    # are moved into one list afterwards
    BLOCK: tl.constexpr = E * T * V
    f0 = fb + st
    f1 = fb + en
    a0 = (f0 // V) * V
    nblk = tl.where(sampled, tl.cdiv(tl.maximum(f1 - a0, 0), BLOCK), 0)
    lastb = a0 + (nblk - 1) * BLOCK
    NW: tl.constexpr = T // 32
    rcw = cap // NW
    lof = (lo ^ ((lo >> 31) & 0x7FFFFFFF)).to(tl.float32, bitcast=True)     # the float whose key is lo
    run = tl.zeros([T], tl.int32)
    wid = tl.zeros([T], tl.int32)
    if nblk > 0:
        run, wid = _scan_block(x_ptr, a0, f0, f1, (a0 - fb).to(tl.int32), lof, scrr, run, rcw, E, T, V, True,
                               ASM)
    rel = _scan_rel(E, T, V)
    has_mid = (tl.zeros([E * T, V], tl.int32) + (nblk > 2).to(tl.int32)) != 0
    xn = tl.load(x_ptr + a0 + BLOCK + rel, mask=has_mid, other=0.0)
    for base in range(a0 + BLOCK, lastb, BLOCK):
        xc = xn
        xn = tl.load(x_ptr + tl.minimum(base + BLOCK, lastb - BLOCK) + rel)   # the last one reloads its own block
        run, wid = _scan_x(xc, (base - fb).to(tl.int32), lof, scrr, run, rcw, E, T, V, ASM)
    if nblk > 1:
        run, wid = _scan_block(x_ptr, lastb, f0, f1, (lastb - fb).to(tl.int32), lof, scrr, run, rcw, E, T, V,
                               True, ASM)
    # every element of a warp holds its count: per warp, the max over the elements with that warp index
    w_ids = tl.arange(0, NW)
    cnt = tl.max(tl.where(wid[None, :] == w_ids[:, None], run[None, :], 0), axis=1)      # [NW]
    wr = tl.sum(cnt, axis=0)
    if tl.max(cnt, axis=0) > rcw:
        wr = cap + 1                 # a region overflowed: some candidates were dropped, the row is bad
    elif nblk > 0:
        tl.debug_barrier()           # every warp's region written before others read it
        _gather_regions(scrr, cnt, rcw, NW, FB)
    # 3. exact select. A sampled row is good when its candidates hold the top k (count >= k) and fit (<= cap);
    # otherwise, and for rows of <= cap entries (which then stay in L2 over the rounds, at 4 B an entry instead of
    # 8 as candidates), the select runs over the row itself.
    tl.debug_barrier()      # the scratch written by every thread of the program is read back by others
    good = sampled & (wr <= cap) & (wr >= k)
    if good:
        m = _select_write1(scrr, wr, st, 1, k, outr, 0, FB, NBIN)
    else:
        m = _select_write1(row, L, st, 1, k, outr, 1, FB, NBIN)
    ar = tl.arange(0, FB)
    if TWO:
        out2r = out2 + r.to(tl.int64) * stride_o
        if good:
            m2 = _select_write1(scrr, wr, st, 1, k2, out2r, 0, FB, NBIN)
        else:
            m2 = _select_write1(row, L, st, 1, k2, out2r, 1, FB, NBIN)
        for off in range(m2, k2, FB):
            tl.store(out2r + off + ar, tl.full([FB], -1, tl.int32), mask=off + ar < k2)
    # the row's counters in the decode path's format: (count above the bracket << 32 | in it), valid count (as
    # far as known: a good sampled row only knows it is >= the candidates; a row of <= cap entries reports the
    # min(k, valid) entries it selected as its bracket; a bad sampled row the INT32_MAX bracket of a fallback)
    tl.store(ctr + r * 2 + 0, tl.where(good, wr, tl.where(sampled, 2147483647, m)).to(tl.int64))
    tl.store(ctr + r * 2 + 1, tl.where(good, wr, m).to(tl.int64))
    for off in range(m, k, FB):
        tl.store(outr + off + ar, tl.full([FB], -1, tl.int32), mask=off + ar < k)
