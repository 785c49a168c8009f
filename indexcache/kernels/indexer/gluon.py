"""Gluon (Triton's explicit-layout dialect) prefill indexer logits for Hopper: ``indexer_logits_triton``'s
contract with each key tile's epilogue overlapped with another tile's tensor-core work (a ping-pong schedule).

Why: the Triton kernel issues a key tile's MMA, waits for it and only then runs the tile's epilogue (relu,
times the per-head weight, sum over heads, times the key scale, window mask, store), so the tensor cores idle
during every epilogue. Here one program owns BQ = 256 / H query rows and all H heads of each (N = 256 MMA
columns):
- a 1-warp producer partition loads the program's q tile [256, 128] once (``_permute_q``'s row order, built on
  the host), then streams the key tiles [64, 128] of the program's window [min row_start, max row_end) through
  a NUM_STAGES shared-memory ring with TMA (``ready``/``empty`` mbarriers per stage); TMA zero-fills keys
  past S;
- two consumer partitions of one warpgroup each take alternate key tiles (even, odd): wait for the tile, one
  m64n256 wgmma acc[64, 256] = k_tile @ q^T (keys as the MMA rows, so a query row's heads are columns, and in
  ``_permute_q``'s order the columns one thread holds are all heads of one query row: the head sum is a sum in
  registers), wait for it, release the stage and reduce: k_scale * sum_h w[q, h] * relu(acc) -> [64, BQ], -inf
  outside each row's window, stored from the registers that hold it. The partitions are separate warps with
  no barrier between them, so one's epilogue runs while the other's MMA does;
- columns left of the window's first tile (the even partition) and right of its last (the odd one) are
  filled with -inf without compute.
Measured on the H200 against one warpgroup-pair overlapping tile j's epilogue with tile j+1's MMA (wgmma
wait_group 1) and against two one-warpgroup CTAs an SM: both were slower at 32 and 64 heads and were deleted.

Limits (checked with clear errors): H a power of two in [16, 128] (32 and 64 are the models'), CUDA tensors
only (Gluon has no interpreter). Compiles without a GPU for sm_90a (``python -m tests.kernels.sm90_compile_gluon
--indexer``); numerics are checked on the GPU only.
"""
from __future__ import annotations

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma, warpgroup_mma_wait
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

D = 128
N_COLS = 256   # MMA columns a program: BQ * H
BKV = 64       # keys a tile: the m64 of one warpgroup's wgmma
NUM_WARPS = 4  # a consumer partition: one warpgroup
_D: gl.constexpr = gl.constexpr(D)


def supports_heads(h: int) -> bool:
    """Whether the kernel takes H heads: a power of two in [16, 128] (BQ = 256 / H query rows a program; below
    16 heads the BQ rows' windows and masks spill registers)."""
    return 16 <= h <= 128 and h & (h - 1) == 0


def config_for(h: int) -> dict:
    """Launch parameters (``indexer_logits_gluon``'s ``config`` overrides them): a ring of ``num_stages`` key
    tiles of 8 KB; ``maxnreg`` 168 for the CTA's 12 warps (two consumer warpgroups, the producer warp padded to a
    warpgroup), the consumers raise theirs to 240 (setmaxnreg) and compile without spills.
    Diagnostic keys (timing only: with any of them not "full" the output is NOT the logits; benchmarks
    ``--diagnose`` uses them to split the kernel's time): ``epilogue`` "none" keeps the MMA, stores and masks but
    takes one head's raw accumulator per (key, row) instead of relu / weights / head sum; ``mma`` "none" skips
    the wgmma and runs the full epilogue on a register tile made from the loaded weights and key scales (relu's
    max against the tile's key scale instead of 0, so no instruction is saved and nothing folds); ``loads``
    "none" loads key tile 0 once and runs every tile's MMA on that stage (no key TMA traffic). The candidates form
    has one of its own, ``append`` (``CANDIDATES_DIAGNOSTIC_MODES``)."""
    return {"num_stages": 4, "maxnreg": 168, **{k: "full" for k in DIAGNOSTIC_MODES},
            **{k: "full" for k in CANDIDATES_DIAGNOSTIC_MODES}}


# the timing diagnostics' config keys and values (``config_for``); "full" is the kernel itself
DIAGNOSTIC_MODES = {"epilogue": ("full", "none"), "mma": ("full", "none"), "loads": ("full", "none")}
# the candidates form's: ``append`` "none" still takes every slot by its atomic but does not wait for it (each
# candidate is written at its key's column mod cap), which times what waiting for the slots costs; the lists are
# then not the candidates
CANDIDATES_DIAGNOSTIC_MODES = {"append": ("full", "none")}


def column_groups(n: int) -> int:
    """Groups of 128 columns in the q tile's order (``_permute_q``): 2 for the N = 256 columns."""
    return max(1, n // 128)


_groups = gluon.constexpr_function(column_groups)  # the same, inside kernels


@gluon.constexpr_function
def _mma_layout(n, num_warps):
    """wgmma accumulator [64, N] of one warpgroup: 16 keys a warp, one 64 x N x 32 fp8 instruction a k-step."""
    return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, n, 32])


@gluon.constexpr_function
def _out_layout(bkv, bq, num_warps):
    """[BKV, BQ] scores with the keys fastest: each warp stores runs of consecutive keys of one query row."""
    spt = max(1, min(4, bkv * bq // (32 * num_warps)))
    tpw0 = min(32, bkv // spt)
    wpc0 = max(1, min(num_warps, bkv // (spt * tpw0)))
    return gl.BlockedLayout([spt, 1], [tpw0, 32 // tpw0], [wpc0, num_warps // wpc0], [0, 1])


@gluon.jit
def _load_partition(q_desc, k_desc, q_smem, k_bufs, q_bar, ready, empty, qrow0, lo_t, n_tiles,
                    NUM_STAGES: gl.constexpr, LOADS: gl.constexpr):
    """Producer (1 warp): the q tile once, then key tile i into stage i % NUM_STAGES once the consumer released
    it. A fresh mbarrier counts as having completed the phase before phase 0, so the first pass over the ring
    waits for parity 1 and goes straight through. Diagnostic ``LOADS`` False: key tile 0 into stage 0 only."""
    BKV: gl.constexpr = k_desc.block_type.shape[0]
    if n_tiles > 0:
        mbarrier.expect(q_bar, q_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(q_desc, [qrow0, 0], q_bar, q_smem)
        if not LOADS:
            mbarrier.expect(ready.index(0), k_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(k_desc, [lo_t, 0], ready.index(0), k_bufs.index(0))
    for i in range(n_tiles if LOADS else 0):
        s = i % NUM_STAGES
        mbarrier.wait(empty.index(s), ((i // NUM_STAGES) & 1) ^ 1)
        bar = ready.index(s)
        mbarrier.expect(bar, k_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(k_desc, [lo_t + i * BKV, 0], bar, k_bufs.index(s))


@gluon.jit
def _issue(k_bufs, q_smem, ready, ks_ptr, i, lo_t, S, acc, NUM_STAGES: gl.constexpr, KL: gl.constexpr,
           MMA_ON: gl.constexpr, LOADS: gl.constexpr):
    """Wait for key tile i, start its MMA and load its key scales. ``acc`` is the accumulator whose registers
    the MMA takes (use_acc=False: its values are ignored): the tile reduced just before, so no registers are
    copied. Diagnostics: ``MMA_ON`` False passes ``acc`` through; ``LOADS`` False reads stage 0 for every tile."""
    BKV: gl.constexpr = k_bufs.type.shape[1]
    if LOADS:
        s = i % NUM_STAGES
        mbarrier.wait(ready.index(s), (i // NUM_STAGES) & 1)
    else:
        s = 0
        mbarrier.wait(ready.index(0), 0)
    if MMA_ON:
        d = warpgroup_mma(k_bufs.index(s), q_smem.permute((1, 0)), acc, use_acc=False, is_async=True)
    else:
        d = acc
    keys = lo_t + i * BKV + gl.arange(0, BKV, layout=KL)
    ks = gl.load(ks_ptr + keys, mask=keys < S, other=0.0)
    return d, ks


@gluon.jit
def _weighted_add(av, aw, bv, bw):
    """(av * aw + bv * bw, 1): two weighted values as one explicit fused multiply-add. The compiler contracts
    a sum of two products into an FMA rounding either product first, its choice varying with the code around
    it; with this combine every addition but the first has one product operand, and the first is spelled out,
    so the logits and candidates forms of the kernel add the same bits (1.0 * x folds away: no extra work)."""
    return gl.fma(av, aw, bv * bw), gl.to_tensor(1.0)


@gluon.jit
def _head_sum(v, w, H: gl.constexpr, BQ: gl.constexpr):
    """sum_h v * w per (key, query row): [BKV, N] values and [1, N] weights -> [BKV, BQ], columns in the q
    tile's order (G column groups of BQS = BQ / G rows; in a group n = (j * BQS + q) * 2 + e for head h = 2j + e,
    see ``_permute_q``): one chain of fused multiply-adds a thread (``_weighted_add``)."""
    BKV: gl.constexpr = v.type.shape[0]
    G: gl.constexpr = _groups(BQ * H)
    BQS: gl.constexpr = BQ // G
    w = gl.broadcast(v, w)[1]
    vh = gl.reshape(gl.permute(gl.reshape(v, [BKV, G, H // 2, BQS, 2]), [0, 1, 3, 2, 4]), [BKV, BQ, H])
    wh = gl.reshape(gl.permute(gl.reshape(w, [BKV, G, H // 2, BQS, 2]), [0, 1, 3, 2, 4]), [BKV, BQ, H])
    return gl.reduce((vh, wh), 2, _weighted_add)[0]


@gluon.jit
def _keep_first(a, b):
    return a


@gluon.jit
def _first_head(p, H: gl.constexpr, BQ: gl.constexpr):
    """Diagnostic (epilogue "none"): ``_head_sum``'s shape and layout with one head's value instead of the sum
    (the reduction keeps its first operand, so it folds away and only the MMA's registers remain)."""
    BKV: gl.constexpr = p.type.shape[0]
    G: gl.constexpr = _groups(BQ * H)
    BQS: gl.constexpr = BQ // G
    heads = gl.permute(gl.reshape(p, [BKV, G, H // 2, BQS, 2]), [0, 1, 3, 2, 4])
    return gl.reduce(gl.reshape(heads, [BKV, BQ, H]), 2, _keep_first)


@gluon.jit
def _reduce_store(d, ks, empty, i, wv, rs, re, out_rows, rmask, lo_t, S, H: gl.constexpr,
                  NUM_STAGES: gl.constexpr, EPILOGUE: gl.constexpr, MMA_ON: gl.constexpr, LOADS: gl.constexpr):
    """Wait for tile i's MMA, hand its stage back to the producer, then k_scale * sum_h w * relu(acc) per (key,
    query row), -inf outside the row's window, stored from the registers that hold it (lane bits 0-1 pick the
    query row: 8 consecutive keys a row, 32 bytes, per store instruction), evict-first in L2 (the logits stream
    out; L2 keeps the keys that every program re-reads). Returns the accumulator (its registers go to the next
    MMA). Diagnostics (``config_for``): ``EPILOGUE`` False stores one head's raw value; ``MMA_ON`` False reduces
    the register tile ``d`` with relu's 0 replaced by the key scale."""
    if MMA_ON:
        d = warpgroup_mma_wait(num_outstanding=0, deps=(d, ))
    BKV: gl.constexpr = d.type.shape[0]
    N: gl.constexpr = d.type.shape[1]
    BQ: gl.constexpr = N // H
    mbarrier.arrive(empty.index((i % NUM_STAGES) if LOADS else 0), count=1)
    if not EPILOGUE:
        lg = _first_head(d, H, BQ)
    elif MMA_ON:
        lg = _head_sum(gl.maximum(d, 0.0), gl.expand_dims(wv, 0), H, BQ)  # [BKV, BQ]
    else:
        lg = _head_sum(gl.maximum(d, gl.expand_dims(ks, 1)), gl.expand_dims(wv, 0), H, BQ)
    KQ: gl.constexpr = lg.type.layout
    ks = gl.convert_layout(ks, gl.SliceLayout(1, KQ))  # the same rows: no data moves
    keys = lo_t + i * BKV + gl.arange(0, BKV, layout=gl.SliceLayout(1, KQ))
    k2 = gl.expand_dims(keys, 1)
    ok = (k2 >= gl.expand_dims(rs, 0)) & (k2 < gl.expand_dims(re, 0))
    lg = gl.where(ok, lg * gl.expand_dims(ks, 1), float("-inf"))
    gl.store(out_rows + k2, lg, mask=gl.expand_dims(rmask, 0) & (k2 < S), eviction_policy="evict_first")
    return d


@gluon.jit
def _reduce_append(d, ks, empty, i, wv, rs, re, rows, rmask, thr, vcnt, cnt_ptr, vals_ptr, cols_ptr, cap, lo_t, S,
                   H: gl.constexpr, NUM_STAGES: gl.constexpr, APPEND: gl.constexpr = True):
    """``_reduce_store``'s scores, kept instead of stored (the candidates form): each valid score >= its row's
    threshold takes the next slot of the row's list by a relaxed atomic increment of the row's count and is
    written there with its column (slots past cap are dropped; the count keeps the true total); ``vcnt`` counts
    the valid (not NaN, not -inf) scores a thread has seen per (key, row) position, added to the rows' counts
    once at the end. The threshold test rejects NaN, and -inf by the threshold's -FLT_MAX floor. ``APPEND`` False:
    the timing diagnostic of ``CANDIDATES_DIAGNOSTIC_MODES``."""
    d = warpgroup_mma_wait(num_outstanding=0, deps=(d, ))
    BKV: gl.constexpr = d.type.shape[0]
    N: gl.constexpr = d.type.shape[1]
    BQ: gl.constexpr = N // H
    mbarrier.arrive(empty.index(i % NUM_STAGES), count=1)
    lg = _head_sum(gl.maximum(d, 0.0), gl.expand_dims(wv, 0), H, BQ)  # [BKV, BQ]
    KQ: gl.constexpr = lg.type.layout
    ks = gl.convert_layout(ks, gl.SliceLayout(1, KQ))  # the same rows: no data moves
    keys = lo_t + i * BKV + gl.arange(0, BKV, layout=gl.SliceLayout(1, KQ))
    k2 = gl.expand_dims(keys, 1) + gl.zeros([BKV, BQ], gl.int32, KQ)
    ok = (k2 >= gl.expand_dims(rs, 0)) & (k2 < gl.expand_dims(re, 0)) & gl.expand_dims(rmask, 0) & (k2 < S)
    v = lg * gl.expand_dims(ks, 1)
    vcnt += (ok & (v == v) & (v != float("-inf"))).to(gl.int32)
    take = ok & (v >= gl.expand_dims(thr, 0))
    r2 = gl.expand_dims(rows, 0) + gl.zeros([BKV, BQ], gl.int32, KQ)
    slot = gl.atomic_add(cnt_ptr + r2 * 2, gl.full([BKV, BQ], 1, gl.int32, KQ), mask=take, sem="relaxed")
    if APPEND:
        keep = take & (slot < cap)
        at = r2.to(gl.int64) * cap + slot
    else:  # timing diagnostic: the slots are taken but never waited for
        keep = take
        at = r2.to(gl.int64) * cap + k2 % cap
    gl.store(vals_ptr + at, v, mask=keep)
    gl.store(cols_ptr + at, k2, mask=keep)
    return d, vcnt


@gluon.jit
def _fill(out_rows, rmask, c0, c1, S, BKV: gl.constexpr, OUT: gl.constexpr):
    """-inf at columns [c0, c1) of the program's rows (c0 a multiple of BKV; columns past S skipped)."""
    BQ: gl.constexpr = out_rows.type.shape[1]
    ninf = gl.full([BKV, BQ], float("-inf"), gl.float32, OUT)
    for c in range(c0, c1, BKV):
        k2 = gl.expand_dims(c + gl.arange(0, BKV, layout=gl.SliceLayout(1, OUT)), 1)
        gl.store(out_rows + k2, ninf, mask=gl.expand_dims(rmask, 0) & (k2 < S))


@gluon.jit
def _consumer_partition(k_bufs, q_smem, q_bar, ready, empty, w_ptr, ks_ptr, rs_ptr, re_ptr, out_ptr, q0, T, S,
                        stride_out, lo_t, n_tiles, thr_ptr, cnt_ptr, vals_ptr, cols_ptr, cap, H: gl.constexpr,
                        NUM_STAGES: gl.constexpr, MMA: gl.constexpr, OUT: gl.constexpr, EPILOGUE: gl.constexpr,
                        MMA_ON: gl.constexpr, LOADS: gl.constexpr, CAND: gl.constexpr, APPEND: gl.constexpr,
                        PARITY: gl.constexpr):
    """One warpgroup, the key tiles i = PARITY, PARITY + 2, ...: wait, one m64nN MMA, wait for it, reduce and
    store. The other parity's partition (its own warps, so no barrier ties the two) runs its MMA meanwhile.
    PARITY 0 fills the -inf columns left of the window, 1 those right of it. ``CAND``: the scores are appended
    to the rows' candidate lists (``_reduce_append``) instead of stored, and nothing is filled."""
    BKV: gl.constexpr = k_bufs.type.shape[1]
    N: gl.constexpr = q_smem.type.shape[0]
    BQ: gl.constexpr = N // H
    rows_o = q0 + gl.arange(0, BQ, layout=gl.SliceLayout(0, OUT))
    rmask_o = rows_o < T
    out_o = out_ptr + gl.expand_dims(rows_o.to(gl.int64) * stride_out, 0)  # [1, BQ]
    if PARITY == 0 and not CAND:
        _fill(out_o, rmask_o, 0, lo_t, S, BKV, OUT)
    if n_tiles > PARITY:
        # the reduced tiles' layout, from a reduction of zeros (once)
        KQ: gl.constexpr = _head_sum(gl.zeros([BKV, N], gl.float32, MMA), gl.zeros([1, N], gl.float32, MMA), H,
                                     BQ).type.layout
        KL: gl.constexpr = gl.SliceLayout(1, MMA)
        rows = q0 + gl.arange(0, BQ, layout=gl.SliceLayout(0, KQ))
        rmask = rows < T
        rs = gl.load(rs_ptr + rows, mask=rmask, other=0).to(gl.int32)
        re = gl.load(re_ptr + rows, mask=rmask, other=0).to(gl.int32)
        out_rows = out_ptr + gl.expand_dims(rows.to(gl.int64) * stride_out, 0)  # [1, BQ]
        # folded weights in the q tile's column order (``_head_sum``)
        BQS: gl.constexpr = BQ // _groups(N)
        cols = gl.arange(0, N, layout=gl.SliceLayout(0, MMA))
        c = cols % (BQS * H)
        cq = (cols // (BQS * H)) * BQS + (c // 2) % BQS
        ch = (c // (2 * BQS)) * 2 + c % 2
        wv = gl.load(w_ptr + (q0 + cq).to(gl.int64) * H + ch, mask=q0 + cq < T, other=0.0)
        mbarrier.wait(q_bar, 0)
        if MMA_ON:
            acc = gl.zeros([BKV, N], gl.float32, MMA)
        else:  # diagnostic: a tile from loaded data in place of the accumulator (w times tile 0's key scales)
            k0 = lo_t + gl.arange(0, BKV, layout=KL)
            acc = gl.expand_dims(gl.load(ks_ptr + k0, mask=k0 < S, other=0.0), 1) * gl.expand_dims(wv, 0)
        if CAND:
            # the threshold floored at -FLT_MAX: a -inf threshold (take every valid score) still rejects -inf
            thr = gl.maximum(gl.load(thr_ptr + rows, mask=rmask, other=float("inf")), -3.4028234663852886e38)
            vcnt = gl.zeros([BKV, BQ], gl.int32, KQ)
            for i in range(PARITY, n_tiles, 2):
                d, ks = _issue(k_bufs, q_smem, ready, ks_ptr, i, lo_t, S, acc, NUM_STAGES, KL, True, True)
                acc, vcnt = _reduce_append(d, ks, empty, i, wv, rs, re, rows, rmask, thr, vcnt, cnt_ptr, vals_ptr,
                                           cols_ptr, cap, lo_t, S, H, NUM_STAGES, APPEND)
            r2 = gl.expand_dims(rows, 0) + gl.zeros([BKV, BQ], gl.int32, KQ)
            gl.atomic_add(cnt_ptr + r2 * 2 + 1, vcnt, mask=vcnt > 0, sem="relaxed")  # valid scores, once
        else:
            for i in range(PARITY, n_tiles, 2):
                d, ks = _issue(k_bufs, q_smem, ready, ks_ptr, i, lo_t, S, acc, NUM_STAGES, KL, MMA_ON, LOADS)
                acc = _reduce_store(d, ks, empty, i, wv, rs, re, out_rows, rmask, lo_t, S, H, NUM_STAGES, EPILOGUE,
                                    MMA_ON, LOADS)
    if PARITY == 1 and not CAND:
        _fill(out_o, rmask_o, lo_t + n_tiles * BKV, S, S, BKV, OUT)


# chunk shapes vary (T, S and the output's row stride): one compile per head count and config
@gluon.jit(do_not_specialize=["T", "S", "stride_out", "cap"])
def _logits_ws_kernel(q_desc, k_desc, w_ptr, ks_ptr, rs_ptr, re_ptr, out_ptr, T, S, stride_out,
                      thr_ptr, cnt_ptr, vals_ptr, cols_ptr, cap,
                      H: gl.constexpr, NUM_STAGES: gl.constexpr, num_warps: gl.constexpr,
                      EPILOGUE: gl.constexpr = True, MMA_ON: gl.constexpr = True, LOADS: gl.constexpr = True,
                      CAND: gl.constexpr = False, APPEND: gl.constexpr = True):
    """Programs run last-first: in a causal prefill the last rows have the longest windows, and starting them
    first shortens the tail of the grid. ``EPILOGUE``, ``MMA_ON``, ``LOADS``: the diagnostic switches
    (``config_for``), True in real use. ``CAND``: the fused prefill top-k's filter (``indexer_candidates_gluon``):
    no logits are stored; each row's valid scores >= thr[row] go to its candidate list (values, columns: cap
    slots a row) and counts[row] = (candidates, valid scores), which must start at zero."""
    BKV: gl.constexpr = k_desc.block_type.shape[0]
    N: gl.constexpr = q_desc.block_type.shape[0]
    BQ: gl.constexpr = N // H
    q0 = (gl.num_programs(0) - 1 - gl.program_id(0)) * BQ
    # the program's key-tile range [lo_t, lo_t + n_tiles * BKV) from its rows' clamped windows
    WL: gl.constexpr = gl.BlockedLayout([1], [32], [num_warps], [0])
    rows = q0 + gl.arange(0, BQ, layout=WL)
    rmask = rows < T
    rs = gl.maximum(gl.load(rs_ptr + rows, mask=rmask, other=0).to(gl.int32), 0)
    re = gl.minimum(gl.load(re_ptr + rows, mask=rmask, other=0).to(gl.int32), S)
    empty_row = re <= rs
    lo = gl.min(gl.where(empty_row, S, rs), axis=0)
    hi = gl.max(gl.where(empty_row, 0, re), axis=0)
    lo_t = gl.where(hi > lo, (lo // BKV) * BKV, 0)
    n_tiles = gl.where(hi > lo, gl.cdiv(hi - lo_t, BKV), 0)

    q_smem = gl.allocate_shared_memory(q_desc.dtype, [N, _D], q_desc.layout)
    k_bufs = gl.allocate_shared_memory(k_desc.dtype, [NUM_STAGES, BKV, _D], k_desc.layout)
    q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    ready = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    mbarrier.init(q_bar, count=1)
    for s in gl.static_range(NUM_STAGES):
        mbarrier.init(ready.index(s), count=1)
        mbarrier.init(empty.index(s), count=1)

    MMA: gl.constexpr = _mma_layout(N, num_warps)
    OUT: gl.constexpr = _out_layout(BKV, BQ, num_warps)
    gl.warp_specialize([
        (_consumer_partition, (k_bufs, q_smem, q_bar, ready, empty, w_ptr, ks_ptr, rs_ptr, re_ptr, out_ptr, q0, T,
                               S, stride_out, lo_t, n_tiles, thr_ptr, cnt_ptr, vals_ptr, cols_ptr, cap, H,
                               NUM_STAGES, MMA, OUT, EPILOGUE, MMA_ON, LOADS, CAND, APPEND, 0)),
        (_load_partition, (q_desc, k_desc, q_smem, k_bufs, q_bar, ready, empty, q0 * H, lo_t, n_tiles,
                           NUM_STAGES, LOADS)),
        (_consumer_partition, (k_bufs, q_smem, q_bar, ready, empty, w_ptr, ks_ptr, rs_ptr, re_ptr, out_ptr, q0, T,
                               S, stride_out, lo_t, n_tiles, thr_ptr, cnt_ptr, vals_ptr, cols_ptr, cap, H,
                               NUM_STAGES, MMA, OUT, EPILOGUE, MMA_ON, LOADS, CAND, APPEND, 1)),
    ], [1, 4], [24, 240])


def operand_layouts(n: int, bkv: int):
    """Shared-memory layouts of the q tile [N, 128] and a key tile [BKV, 128] (128-byte swizzle: rows of 128
    fp8)."""
    return (gl.NVMMASharedLayout.get_default_for([n, D], gl.float8e4nv),
            gl.NVMMASharedLayout.get_default_for([bkv, D], gl.float8e4nv))


def _permute_q(q_fp8, bq: int):
    """q [T, H, 128] -> the programs' q tiles [ceil(T/BQ) * BQ*H, 128] (rows past T zero), each a run of column
    groups of BQS = BQ / column_groups(BQ*H) query rows, whose rows go in the order n = (j * BQS + q) * 2 + e
    for query row q and head h = 2j + e. The wgmma accumulator gives each lane of a quad the column pairs
    8m + 2 * (lane % 4) + {0, 1}: in this order the lane bits pick the query row, and a thread holds H / 2 or
    more of its row's heads, so the head sum is a sum in registers (and at most one shuffle at H=64) instead
    of a reduction across the quad."""
    t, h, _ = q_fp8.shape
    tb = -(-t // bq)
    bqs = bq // column_groups(bq * h)
    u8 = q_fp8.contiguous().view(torch.uint8)
    if tb * bq != t:
        pad = torch.zeros(tb * bq, h, D, dtype=torch.uint8, device=q_fp8.device)
        pad[:t] = u8
        u8 = pad
    tiles = u8.view(tb * bq // bqs, bqs, h // 2, 2, D).permute(0, 2, 1, 3, 4).contiguous()
    return tiles.view(tb * bq * h, D).view(torch.float8_e4m3fn)


def _merged_config(h: int, config: dict | None, who: str) -> dict:
    """``config_for(h)`` updated with ``config``, checked (unknown keys and bad values name themselves)."""
    cfg = config_for(h)
    unknown = sorted(set(config or {}) - set(cfg))
    if unknown:
        raise ValueError(f"{who}: unknown config keys {unknown}; the keys are {sorted(cfg)}")
    cfg.update(config or {})
    check_gluon_config(h, cfg)
    return cfg


def check_gluon_config(h: int, cfg: dict):
    if not supports_heads(h):
        raise ValueError(f"indexer_logits_gluon: H must be a power of two in [16, 128] (BQ = 256 / H query rows "
                         f"a program), got H={h}")
    for key, allowed in {**DIAGNOSTIC_MODES, **CANDIDATES_DIAGNOSTIC_MODES}.items():
        if cfg[key] not in allowed:
            raise ValueError(f"indexer_logits_gluon: config {key} must be one of {list(allowed)} (\"none\" is a "
                             f"timing diagnostic), got {cfg[key]!r}")
    if not isinstance(cfg["num_stages"], int) or not 2 <= cfg["num_stages"] <= 8:
        raise ValueError(f"indexer_logits_gluon: config num_stages must be an int in [2, 8], got "
                         f"{cfg['num_stages']!r}")


def indexer_logits_gluon(q_fp8, w, k_fp8, k_scale, row_start, row_end, *, out=None, config=None):
    """``indexer_logits_triton``'s contract (inputs already checked by ``indexer_logits``) on Hopper.
    ``config``: num_stages, maxnreg, and the timing diagnostics epilogue, mma, loads (see ``config_for``; not
    "full": the output is not the logits)."""
    t, h, _ = q_fp8.shape
    s = k_fp8.shape[0]
    cfg = _merged_config(h, config, "indexer_logits_gluon")
    if cfg["append"] != "full":
        raise ValueError(f"indexer_logits_gluon: the append diagnostic is the candidates form's only, got "
                         f"append={cfg['append']!r}")
    if not q_fp8.is_cuda:
        raise ValueError(f"indexer_logits_gluon: needs CUDA tensors (Gluon has no CPU interpreter), got "
                         f"{q_fp8.device}")
    if out is None:
        out = torch.empty(t, s, device=q_fp8.device, dtype=torch.float32)
    if t == 0 or s == 0:
        out.fill_(float("-inf"))  # no keys: every window is empty
        return out
    _launch(q_fp8, w, k_fp8, k_scale, row_start, row_end, cfg, out, (out, out, out, out, 0),
            EPILOGUE=cfg["epilogue"] == "full", MMA_ON=cfg["mma"] == "full", LOADS=cfg["loads"] == "full", CAND=False)
    return out


def indexer_candidates_gluon(q_fp8, w, k_fp8, k_scale, row_start, row_end, thr, cand_val, cand_col, counts, *,
                             config=None):
    """``indexer_candidates_triton``'s contract (inputs checked by ``indexer_prefill_candidates``) on Hopper: the
    logits kernel above with the fused top-k's filter as its epilogue, so the scores are bit-identical to
    ``indexer_logits_gluon``'s. cand_val [T,cap] fp32, cand_col [T,cap] int32, counts [T,2] int32 (zeroed here).
    ``config``: num_stages, maxnreg, and the timing diagnostic append (``CANDIDATES_DIAGNOSTIC_MODES``; the
    logits form's diagnostic modes are its own)."""
    t, h, _ = q_fp8.shape
    cfg = _merged_config(h, config, "indexer_candidates_gluon")
    timing_only = sorted(k for k in DIAGNOSTIC_MODES if cfg[k] != "full")
    if timing_only:
        raise ValueError(f"indexer_candidates_gluon: the diagnostic modes are the logits form's only, got "
                         f"{ {k: cfg[k] for k in timing_only} }")
    if not q_fp8.is_cuda:
        raise ValueError(f"indexer_candidates_gluon: needs CUDA tensors (Gluon has no CPU interpreter), got "
                         f"{q_fp8.device}")
    counts.zero_()
    if t == 0 or k_fp8.shape[0] == 0:
        return
    _launch(q_fp8, w, k_fp8, k_scale, row_start, row_end, cfg, cand_val,
            (thr.contiguous(), counts, cand_val, cand_col, cand_val.shape[1]), CAND=True,
            APPEND=cfg["append"] == "full")


def _launch(q_fp8, w, k_fp8, k_scale, row_start, row_end, cfg, out, cand, **modes):
    """One launch of ``_logits_ws_kernel``: q in ``_permute_q``'s order, TMA descriptors, a program per BQ rows.
    ``cand``: (thr, counts, values, columns, cap) of the candidates form (placeholders in the logits form)."""
    t, h, _ = q_fp8.shape
    s = k_fp8.shape[0]
    bq = N_COLS // h
    q2 = _permute_q(q_fp8, bq)
    k2 = k_fp8.contiguous()
    if k2.data_ptr() % 16:  # a row slice of keys starts at a multiple of 128 bytes; only an odd view fails
        k2 = k2.clone()
    q_layout, k_layout = operand_layouts(N_COLS, BKV)
    q_desc = TensorDescriptor.from_tensor(q2, [N_COLS, D], q_layout)
    k_desc = TensorDescriptor.from_tensor(k2, [BKV, D], k_layout)
    grid = (triton.cdiv(t, bq),)
    _logits_ws_kernel[grid](q_desc, k_desc, w.contiguous(), k_scale.contiguous(), row_start.contiguous(),
                            row_end.contiguous(), out, t, s, out.stride(0), *cand, H=h,
                            NUM_STAGES=cfg["num_stages"], num_warps=NUM_WARPS, maxnreg=cfg["maxnreg"], **modes)
