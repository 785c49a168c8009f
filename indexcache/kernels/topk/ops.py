"""Exact per-row top-k over (masked) logits: ``topk_rows``; checks and launch planning for ``triton.py`` and
``triton.py`` (``_topk1_kernel``).

Triton on CUDA tensors (or on CPU under TRITON_INTERPRET=1), ``topk_rows_reference`` otherwise.
Output order within a row is unspecified unless ``sorted=True`` (then value-descending, ties by column).
Launch paths, chosen by row count: decode (R <= 64: sample / fused scan / final, ``triton``) and prefill (R > 64:
one launch of ``_topk1_kernel``, one program per row: a sample sets the threshold, one read of the row writes the
candidates, an exact select picks the k); docs/kernels_attention.md has the design and the measurements behind
these constants.

``topk_rows_decode``: the same selection with one row spread over many programs (a radix select in three launches),
for a few long rows replayed in a CUDA graph; ``DecodeTopkWorkspace`` holds its self-resetting scratch.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton

from indexcache.kernels._dispatch import interpreting, use_triton
from indexcache.kernels.topk.reference import topk_rows_reference

MAX_K = 4096
_SAMPLE = 1024          # decode-path sample when that path is forced on R > _SMALL_R rows (power of two)
_SAMPLE_SMALL = 512     # decode-sized batches: a cheaper sort (~half), a wider bracket (CAP doubled)
_SMALL_R = 64           # R <= _SMALL_R: decode path (fused scan); larger R: one-pass prefill path
_BLOCK = 4096           # decode scan block (entries per step of the fused count+compact pass)
_SCAN_WARPS = 8
_FB = 2048              # decode final select (histogram) tile
_NBIN = 256             # histogram bins per final-select round
_TB = 256               # tie buffer: the boundary bin is ranked by counting once it holds <= _TB entries
_ONE_WARPS = 8          # one-pass prefill path: warps per row program (4: 168 registers and spills on sm_90a)
_ONE_MAXNREG = 128      # two row programs per SM: Triton 3.6 gives the kernel 233 registers unless capped (3.7: 117)
_ONE_BLOCK = 4096       # one-pass scan block: [E, 32 * warps, 16-byte vector] entries
_ONE_SB, _ONE_NTMAX = 1024, 16   # one-pass sample: tile, at most 16 tiles (ns ~ 32 * L / k, <= 16384)
_ONE_FB = 4096          # one-pass select tile: ~2k candidates per row in one or two tiles per round
_ONE_NBIN = 64          # one-pass select: bins per histogram round (tl.histogram: 32-64 bins cost the least per bit)
PATHS = ("scan", "one")  # decode path (fused scan), one-pass prefill path


def _check(logits, k, row_start, row_end, sample=None):
    if logits.dim() != 2:
        raise ValueError(f"topk_rows: logits must be 2-D [R, N], got shape {tuple(logits.shape)}")
    if logits.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"topk_rows: logits dtype must be float32/bfloat16/float16, got {logits.dtype}")
    if not isinstance(k, int) or isinstance(k, bool) or k < 1 or k > MAX_K:
        raise ValueError(f"topk_rows: k must be an int in [1, {MAX_K}], got {k!r}")
    if sample is not None and sample not in (512, 1024, 2048, 4096):   # >= 512 keeps CAP <= 8k (scratch bound)
        raise ValueError(f"topk_rows: sample must be 512, 1024, 2048 or 4096, got {sample!r}")
    R = logits.shape[0]
    for name, t in (("row_start", row_start), ("row_end", row_end)):
        if t is None:
            continue
        if t.dim() != 1 or t.shape[0] != R:
            raise ValueError(f"topk_rows: {name} must have shape [{R}], got {tuple(t.shape)}")
        if t.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"topk_rows: {name} must be int32/int64, got {t.dtype}")
        if t.device != logits.device:
            raise ValueError(f"topk_rows: {name} is on {t.device}, logits on {logits.device}")


def _sort_out(logits, idx):
    vals = torch.gather(logits.float(), 1, idx.clamp(min=0).long())
    vals = torch.where(idx < 0, torch.full_like(vals, float("-inf")), vals + 0.0)
    # order: value desc, column asc, -1 last
    col_key = torch.where(idx < 0, torch.full_like(idx, 2**31 - 1), idx)
    o1 = torch.argsort(col_key, dim=1, stable=True)
    v1 = torch.gather(vals, 1, o1)
    o2 = torch.argsort(v1, dim=1, descending=True, stable=True)
    return torch.gather(torch.gather(idx, 1, o1), 1, o2)


def scratch_bytes_per_row(k: int, n: int) -> int:
    """An upper bound of the device bytes one ``topk_rows`` call allocates per row (output, window bounds, row
    state and counters, candidate scratch), whichever path it takes, so callers that bound their memory
    (``indexer_topk_prefill``) can budget for the selection. No path keeps per-chunk state, so the bound does not
    grow with the row length ``n``. Compiled kernels only: the interpreter's 256-entry decode sample doubles that
    path's CAP (for k > 256)."""
    scan = (max(4096, 8 * _next_pow2(k)) + _TB) * 8 + 8 * 4 + 2 * 8    # decode: CAP + tie buffer at S = 512, state, ctr
    return 4 * k + 2 * 4 + max(scan, _one_pass_bytes(k))


def _one_pass_bytes(k: int) -> int:
    """The one-pass prefill path's scratch per row: CAP int64 composites and the counters."""
    return max(4096, 4 * _next_pow2(k)) * 8 + 2 * 8


def _next_pow2(x: int) -> int:
    return 1 << max(int(x) - 1, 0).bit_length()


def topk_rows(logits: torch.Tensor, k: int, *, row_start: torch.Tensor | None = None,
              row_end: torch.Tensor | None = None, sorted: bool = False, stats: dict | None = None,
              sample: int | None = None, _cap: int | None = None, _chunk: int | None = None,
              _path: str | None = None) -> torch.Tensor:
    """Column ids (int32 [R, k]) of the k largest values of each row among columns in [row_start, row_end).

    NaN and -inf never count; rows with fewer than k valid entries are padded with -1 (after the valid ids).
    Exact, with ties at the threshold broken towards the lower column index. ``stats``: a dict that receives the
    Triton path's per-row state of this call (see ``bracket_stats``; tests, benchmarks). ``sample``: entries
    sampled per row to bracket the k-th value on the decode path (512..4096, a power of two; default 512 for
    R <= 64; the prefill path sizes its sample by the row length). ``_cap`` / ``_chunk`` / ``_path`` are test hooks
    (``_path``: "scan" = the decode path, "one" = the one-launch prefill path (``_topk1_kernel``); default by
    row count).
    """
    _check(logits, k, row_start, row_end, sample)
    if not use_triton(logits):
        return topk_rows_reference(logits, k, row_start=row_start, row_end=row_end)
    stages, out, dbg = plan_launches(logits, k, row_start, row_end, sample=sample, _cap=_cap, _chunk=_chunk,
                                     _path=_path)
    for _, fn in stages:
        fn()
    if stats is not None:
        stats.update(dbg)
    return _sort_out(logits, out) if sorted else out


def plan_launches(logits, k, row_start=None, row_end=None, *, sample=None, _cap=None, _chunk=None, _path=None,
                  _maxnreg=_ONE_MAXNREG, _warps=None):
    """Buffers and the launches of one call, as (name, thunk) pairs (benchmarks time them one by one):
    decode path sample / scan / final; prefill path select (one launch; ``_maxnreg``: its register cap, None =
    the compiler's choice; ``_warps``: warps a row program, a test hook: under the interpreter the default is one,
    and the scan's per-warp candidate regions need more to be tested)."""
    from indexcache.kernels.topk import triton as tk

    R, N = logits.shape
    dev = logits.device
    out = torch.empty((R, k), dtype=torch.int32, device=dev)
    if R == 0:
        return [], out, {}
    logits, starts, ends = _rows_and_windows(logits, row_start, row_end)
    interp = interpreting()
    small = R <= _SMALL_R
    path = _path or ("scan" if small else "one")
    if path not in PATHS:
        raise ValueError(f"topk_rows: _path must be one of {PATHS}, got {path!r}")
    if path == "one":
        return _plan_one(logits, k, starts, ends, out, _cap, interp, maxnreg=_maxnreg, warps=_warps)
    S = sample or (256 if interp else (_SAMPLE_SMALL if small else _SAMPLE))
    # bracket ~ 6*sqrt(k*len/S) entries: CAP = 4k at S >= 1024, 8k at S = 512 (runtime value: no recompiles)
    cap = _cap or max(4096, 4 * triton.next_power_of_2(k) * max(1, 1024 // S))
    block = 256 if interp else _BLOCK
    fb, tb = (256, 64) if interp else (_FB, _TB)
    if _chunk is not None:
        chunk = _chunk
    elif interp:
        chunk = 1024
    else:   # >= 4 programs per SM
        sms = torch.cuda.get_device_properties(dev).multi_processor_count
        progs_per_row = max(1, (4 * sms + R - 1) // R)
        chunk = max(block, triton.cdiv(triton.cdiv(N, progs_per_row), block) * block)
    nc = triton.cdiv(max(N, 1), chunk)
    state = torch.empty((R, 8), dtype=torch.int32, device=dev)
    ctr = torch.empty((R, 2), dtype=torch.int64, device=dev)
    scr = torch.empty((R, cap + tb), dtype=torch.int64, device=dev)
    s = logits.stride(0)
    x = logits

    def sample_launch():
        tk._topk_sample_kernel[(R,)](x, s, starts, ends, state, ctr, k, S=S, RUN=8, num_warps=8)

    def scan():
        tk._topk_scan_kernel[(R, nc)](x, s, starts, ends, state, ctr, out, scr, k, cap, chunk, BLOCK=block, TB=tb,
                                      num_warps=_SCAN_WARPS)

    def final():
        tk._topk_final_kernel[(R,)](x, s, starts, ends, state, ctr, out, scr, k, cap, BLOCK=block, FB=fb, NB=16,
                                    NBIN=64 if interp else _NBIN, TB=tb, TI=16 if interp else 32, num_warps=8)

    dbg = dict(state=state, ctr=ctr, cap=cap, chunk=chunk, nc=nc, S=S, path=path)
    return [("sample", sample_launch), ("scan", scan), ("final", final)], out, dbg


def _rows_and_windows(logits, row_start, row_end):
    """The launches' inputs: logits with unit column stride, and int32 window bounds clamped to [0, N]."""
    R, N = logits.shape
    dev = logits.device
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    starts = (torch.zeros(R, dtype=torch.int32, device=dev) if row_start is None
              else row_start.to(torch.int32).clamp(0, N))
    ends = (torch.full((R,), N, dtype=torch.int32, device=dev) if row_end is None
            else row_end.to(torch.int32).clamp(0, N))
    return logits, starts, ends


def _plan_one(x, k, starts, ends, out, cap, interp, out2=None, k2=0, maxnreg=_ONE_MAXNREG, warps=None):
    """The one-launch prefill path (``_topk1_kernel``): one program per row, CAP = 4 * next_pow2(k) >= 4096.
    ``out2`` (same row stride as ``out``): also the k2 <= k largest, from the same candidates."""
    from indexcache.kernels.topk import triton as t1

    R = x.shape[0]
    cap = cap or max(4096, 4 * triton.next_power_of_2(k))
    two = out2 is not None
    ctr = torch.empty((R, 2), dtype=torch.int64, device=x.device)
    scr = torch.empty((R, cap), dtype=torch.int64, device=x.device)
    warps = warps or (1 if interp else _ONE_WARPS)
    v = 16 // x.element_size()              # entries per 16-byte vector load
    blk = max(512, 32 * warps * v) if interp else _ONE_BLOCK    # at least one vector a thread
    sb, fb, nbin = (64, 512, 32) if interp else (_ONE_SB, _ONE_FB, _ONE_NBIN)

    def select():
        t1._topk1_kernel[(R,)](x, x.stride(0), starts, ends, ctr, out, scr, k, cap, out.stride(0),
                               out2 if two else out, k2, E=blk // (32 * warps * v), T=32 * warps, V=v, SB=sb,
                               NTMAX=_ONE_NTMAX, FB=fb, NBIN=nbin, ASM=not interp, TWO=two, num_warps=warps,
                               maxnreg=maxnreg)

    return [("select", select)], out, dict(ctr=ctr, cap=cap, path="one")


def bracket_stats(dbg, k):
    """(rows that took the exact fallback, mean bracket size) from the ``stats`` dict of a ``topk_rows`` call."""
    ctr = dbg["ctr"]
    chi, n_in, nv = ctr[:, 0] >> 32, ctr[:, 0] & 0xFFFFFFFF, ctr[:, 1]
    m = torch.clamp(nv, max=k)
    good = (chi < m) & (chi + n_in >= m) & (n_in <= dbg["cap"])
    return int(((m > 0) & ~good).sum()), float(n_in.double().mean()) if n_in.numel() else 0.0



_D_NB1 = 256        # bins of radix digit 1 (key bits 31..24); the kernels hard-code the digit positions
_D_NB = 4096        # bins of radix digit 2 (key bits 23..12)
_D_NREP = 4         # replicas of the digit-2 histogram for the per-entry atomics (a hot bin over 4 addresses)
_D_W = 32           # window of the digit-2 block histogram: top 32, bottom 32, 64 around the mean (128 bins)
_D_HROW = _D_NB1 + _D_NREP * _D_NB   # int32 histogram entries per row: hist1 | hist2 replicas
_D_BLOCK = 1024     # entries per block of the hist / filter1 passes
_D_BLOCK2 = 256     # list1 entries per block of the filter2 pass
_D_PROGS_PER_SM = 4  # target programs per SM over all rows
_D_TB, _D_TI = 256, 32   # final select: rank by counting up to _D_TB entries, _D_TI at a time
_D_FB, _D_NBIN = 1024, 256   # final select of a longer list: tile and bins per histogram round; padding tile
_D_WARPS = 4


@dataclass
class DecodeTopkWorkspace:
    """Scratch of ``topk_rows_decode`` for ``rows`` rows of up to ``n`` entries (16 B per entry per row plus
    65 KiB per row). ``hist`` and ``ctr`` must be zero between calls; the kernels leave them so."""
    rows: int
    n: int
    hist: torch.Tensor      # int32 [rows, 256 + NREP * 4096]: hist1 | hist2 replicas
    ctr: torch.Tensor       # int64 [rows, 8]: slot counters of filter1 / filter2, arrivals of the three launches
    state: torch.Tensor     # int32 [rows, 8]: m, B1, above1, n1, B2, above, n2
    lists: torch.Tensor     # int64 [rows, 2, n]: list1 | list2 composites

    @classmethod
    def new(cls, rows: int, n: int, device) -> "DecodeTopkWorkspace":
        if rows < 1 or n < 1:
            raise ValueError(f"DecodeTopkWorkspace: rows and n must be >= 1, got rows={rows}, n={n}")
        return cls(rows, n, torch.zeros((rows, _D_HROW), dtype=torch.int32, device=device),
                   torch.zeros((rows, 8), dtype=torch.int64, device=device),
                   torch.empty((rows, 8), dtype=torch.int32, device=device),
                   torch.empty((rows, 2, n), dtype=torch.int64, device=device))

    @staticmethod
    def bytes_per_row(n: int) -> int:
        """Device bytes of one row of a workspace for rows of up to ``n`` entries."""
        return _D_HROW * 4 + 8 * 8 + 8 * 4 + 2 * n * 8

    def head(self, rows: int) -> "DecodeTopkWorkspace":
        """A workspace over the first ``rows`` rows of this one (views of the same memory, same ``n``): one
        allocation serves every batch of up to ``self.rows`` rows, as long as no two calls overlap in time."""
        if not 1 <= rows <= self.rows:
            raise ValueError(f"DecodeTopkWorkspace.head: rows must be in [1, {self.rows}], got {rows}")
        return DecodeTopkWorkspace(rows, self.n, self.hist[:rows], self.ctr[:rows], self.state[:rows],
                                   self.lists[:rows])


def topk_rows_decode(logits: torch.Tensor, k: int, *, row_start: torch.Tensor | None = None,
                     row_end: torch.Tensor | None = None, workspace: DecodeTopkWorkspace | None = None,
                     _slice: int | None = None) -> torch.Tensor:
    """Column ids (int32 [R, k]) of the k largest values of each row among columns in [row_start, row_end);
    exactly ``topk_rows``'s selection (NaN / -inf never count, ties to the lower column, -1 padding after the
    valid ids; order within a row unspecified). Pass a ``DecodeTopkWorkspace`` made once per (rows, row length)
    when capturing a CUDA graph (the graph then holds only the three launches); without one each call allocates
    a zeroed workspace. ``_slice``: entries per program (test hook)."""
    _check(logits, k, row_start, row_end)
    if not use_triton(logits):
        return topk_rows_reference(logits, k, row_start=row_start, row_end=row_end)
    return plan_decode_launches(logits, k, row_start, row_end, workspace=workspace, _slice=_slice)[1]()


def plan_decode_launches(logits, k, row_start=None, row_end=None, *, workspace=None, _slice=None, _warps=None):
    """The launches of one ``topk_rows_decode`` call as (name, thunk) pairs, and a thunk that runs them all and
    returns the output (benchmarks time the launches one by one). ``_warps``: warps of the hist and filter1
    launches (benchmark hook, like ``_slice``)."""
    from indexcache.kernels.topk import triton as tk

    R, N = logits.shape
    dev = logits.device
    out = torch.empty((R, k), dtype=torch.int32, device=dev)
    if R == 0:
        return [], lambda: out
    if workspace is None:
        workspace = DecodeTopkWorkspace.new(R, max(N, 1), dev)
    elif workspace.rows != R or workspace.n < N or workspace.hist.device != dev:
        raise ValueError(f"topk_rows_decode: workspace is for {workspace.rows} rows of <= {workspace.n} entries on "
                         f"{workspace.hist.device}, got logits {tuple(logits.shape)} on {dev}")
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    # the kernels clamp the bounds to [0, N] and take absent ones as 0 / N (no launches here for either)
    starts = row_start.to(torch.int32) if row_start is not None else logits
    ends = row_end.to(torch.int32) if row_end is not None else logits
    win = dict(HAS_START=row_start is not None, HAS_END=row_end is not None)
    interp = interpreting()
    block = 128 if interp else _D_BLOCK
    if _slice is not None:
        sl = _slice
    elif interp:
        sl = 512
    else:   # ~_D_PROGS_PER_SM programs per SM over all rows, whole blocks each
        sms = torch.cuda.get_device_properties(dev).multi_processor_count
        per_row = max(1, triton.cdiv(_D_PROGS_PER_SM * sms, R))
        sl = triton.cdiv(triton.cdiv(max(N, 1), per_row), block) * block
    P = triton.cdiv(max(N, 1), sl)     # program p reads columns [p * sl, (p + 1) * sl), masked by the window
    ws, cap, x, s = workspace, workspace.n, logits, logits.stride(0)
    warps = _warps or _D_WARPS

    def hist():
        tk._dtopk_hist_kernel[(R, P)](x, s, N, starts, ends, ws.hist, ws.ctr, ws.state, k, sl, BLOCK=block,
                                      NB1=_D_NB1, HROW=_D_HROW, num_warps=warps, **win)

    def filter1():
        tk._dtopk_filter1_kernel[(R, P)](x, s, N, starts, ends, ws.hist, ws.ctr, ws.state, out, ws.lists, k, sl,
                                         cap, BLOCK=block, NB1=_D_NB1, HROW=_D_HROW, NB=_D_NB, NREP=_D_NREP, W=_D_W,
                                         num_warps=warps, **win)

    def filter2_final():
        tk._dtopk_filter2_final_kernel[(R, P)](ws.ctr, ws.state, out, ws.lists, k, cap,
                                               BLOCK=64 if interp else _D_BLOCK2, TB=64 if interp else _D_TB,
                                               TI=16 if interp else _D_TI, FB=256 if interp else _D_FB,
                                               NBIN=64 if interp else _D_NBIN, num_warps=_D_WARPS)

    stages = [("hist", hist), ("filter1", filter1), ("filter2_final", filter2_final)]

    def run():
        for _, fn in stages:
            fn()
        return out

    return stages, run


MAX_POOL = 16384


def _check_pool(c, fn: str):
    if not isinstance(c, int) or isinstance(c, bool) or c < 1 or c > MAX_POOL:
        raise ValueError(f"{fn}: c must be an int in [1, {MAX_POOL}], got {c!r}")


def topk_pool_rows(logits: torch.Tensor, c: int, *, row_start: torch.Tensor | None = None,
                   row_end: torch.Tensor | None = None, workspace: DecodeTopkWorkspace | None = None,
                   _path: str | None = None, _cap: int | None = None) -> torch.Tensor:
    """Column ids (int32 [R, c]) of the c largest values per row among columns in [row_start, row_end): the
    selection of ``topk_rows`` (exact, ties to the lower column, NaN / -inf never, -1 padding after the valid
    ids) for candidate pools wider than its MAX_K, up to MAX_POOL. The order within a row is unspecified
    (re-rank layers break their ties by position, not by pool order). Rows of more than 64: the one-launch prefill
    path (one program per row, no atomics); up to 64: the decode path (``topk_rows_decode``, one row over many
    programs; ``workspace`` as there; its atomics leave the order open, run to run).
    ``_path``: "one" / "decode", ``_cap``: the one-launch path's candidate capacity (test hooks)."""
    _check(logits, 1, row_start, row_end)
    _check_pool(c, "topk_pool_rows")
    if not use_triton(logits):
        return topk_rows_reference(logits, c, row_start=row_start, row_end=row_end)
    R = logits.shape[0]
    path = _path or ("decode" if R <= _SMALL_R else "one")
    if path == "decode":
        return plan_decode_launches(logits, c, row_start, row_end, workspace=workspace)[1]()
    if path != "one":
        raise ValueError(f"topk_pool_rows: _path must be 'one' or 'decode', got {path!r}")
    stages, out, _ = plan_launches(logits, c, row_start, row_end, _cap=_cap, _path="one")
    for _, fn in stages:
        fn()
    return out


def topk_and_pool_rows(logits: torch.Tensor, k: int, c: int, *, row_start: torch.Tensor | None = None,
                       row_end: torch.Tensor | None = None, _cap: int | None = None) -> torch.Tensor:
    """int32 [R, k + c]: ``topk_rows``' k columns, then ``topk_pool_rows``' c columns of each row (an F layer's
    top-k and the candidate pool it publishes), both exact with ties to the lower column, each -1 padded after its
    valid ids, order within each part unspecified. One launch and one read of the row: the wider of the two is
    selected as ``topk_pool_rows``' one-launch path does, the narrower from the same candidates (they hold every
    entry at or above the wider's threshold). k in [1, MAX_K], c in [1, MAX_POOL]; ``_cap`` as there (tests)."""
    _check(logits, k, row_start, row_end)
    _check_pool(c, "topk_and_pool_rows")
    if not use_triton(logits):
        return torch.cat([topk_rows_reference(logits, n, row_start=row_start, row_end=row_end) for n in (k, c)], 1)
    res = torch.empty((logits.shape[0], k + c), dtype=torch.int32, device=logits.device)
    if logits.shape[0] == 0:
        return res
    x, starts, ends = _rows_and_windows(logits, row_start, row_end)
    top, pool = res[:, :k], res[:, k:]
    wide, narrow = (pool, top) if c >= k else (top, pool)
    stages, _, _ = _plan_one(x, max(k, c), starts, ends, wide, _cap, interpreting(), out2=narrow, k2=min(k, c))
    for _, fn in stages:
        fn()
    return res


def topk_and_pool_scratch_bytes_per_row(k: int, c: int, n: int) -> int:
    """An upper bound of the device bytes per row of a ``topk_and_pool_rows`` call: its output, window bounds and
    the wider selection's candidate scratch (no more grows with the row length n)."""
    return 4 * (k + c) + 2 * 4 + _one_pass_bytes(max(k, c))


def pool_scratch_bytes_per_row(c: int, n: int) -> int:
    """An upper bound of the device bytes per row of a ``topk_pool_rows`` call of more than 64 rows (the
    one-launch path: output, window bounds, scratch). Calls of up to 64 rows take the decode path instead: a
    ``DecodeTopkWorkspace`` of at most 64 rows (``bytes_per_row(n)`` each, about 3.3 MB at n = 200K), whatever
    the budget."""
    return 4 * c + 2 * 4 + _one_pass_bytes(c)

