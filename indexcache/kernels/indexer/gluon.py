"""Gluon (Triton's explicit-layout dialect) prefill indexer logits for Hopper: ``indexer_logits_triton``'s
contract with each key tile's epilogue overlapped with the next tile's tensor-core work.

Why: the Triton kernel issues a key tile's MMA, waits for it and only then runs the tile's epilogue (relu,
times the per-head weight, sum over heads, times the key scale, window mask, store), so the tensor cores idle
during every epilogue. Here one program owns BQ query rows and all H heads of each (N = BQ*H MMA columns):
- a 1-warp producer partition loads the program's q tile [N, 128] once (``_permute_q``'s row order, built on
  the host), then streams the key tiles [BKV, 128] of the program's window [min row_start, max row_end) through
  a NUM_STAGES shared-memory ring with TMA (``ready``/``empty`` mbarriers per stage); TMA zero-fills keys
  past S;
- the consumer warpgroups (the default partition: 64 keys each, side by side in column groups of 128 columns
  when N = 256) compute acc[BKV, N] = k_tile @ q^T with wgmma (keys as the MMA rows, so a query row's heads
  are columns, and in ``_permute_q``'s order the columns one thread holds are all heads of one query row: the
  head sum is a sum in registers), issue tile j+1's wgmma into a second register accumulator,
  ``wgmma.wait_group 1`` (tile j is done while j+1 still runs), release tile j's stage and reduce it:
  k_scale * sum_h w[q, h] * relu(acc) -> [BKV, BQ], -inf outside each row's window, stored from the
  registers that hold it. Key scales of tile j are loaded when tile j is issued.
- columns left of the window's first tile and right of its last are filled with -inf without compute.

Limits (checked with clear errors): H a power of two (2..128) with BQ*H = 64..256 columns (32 and 64 heads are
the models'), CUDA tensors only (Gluon has no interpreter). Compiles without a GPU for sm_90a
(``python -m tests.kernels.sm90_compile_gluon --indexer``); numerics are checked on the GPU only.
"""
from __future__ import annotations

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma, warpgroup_mma_wait
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

D = 128
_D: gl.constexpr = gl.constexpr(D)


def config_for(h: int) -> dict:
    """BQ query rows a program: N = BQ*H = 256 MMA columns on two consumer warpgroups side by side (each holds
    two [64, 128] accumulators beside its epilogue; both read the same 64-key tile, so a key tile crosses from
    L2 once per 256 columns, as in the Triton kernel's BQ*HP = 256), a ring of NUM_STAGES key tiles of 8 KB.
    maxnreg 168: the CTA's 12 warps (8 consumers, the producer warp padded to a warpgroup) fit an SM's
    registers; the consumers raise their limit to 240 (setmaxnreg) and compile without spills. The other
    shape (``BQ``: 128 // H, ``num_warps``: 4, ``maxnreg``: 128) runs two CTAs of one warpgroup an SM instead.
    ``evict_first``: the logits' stores ask L2 to evict their lines first (they are written once), so that the
    key tiles, which every program reads, stay in L2."""
    return {"BQ": max(1, 256 // h), "num_warps": 8, "num_stages": 4, "maxnreg": 168, "evict_first": True}


def column_groups(n: int) -> int:
    """Warpgroups side by side along the N = BQ*H MMA columns: one per 128 columns (each holds two [64, 128]
    accumulators), so N = 256 takes two warpgroups on the same 64 keys."""
    return max(1, n // 128)


_groups = gluon.constexpr_function(column_groups)  # the same, inside kernels


@gluon.constexpr_function
def _mma_layout(n, num_warps):
    """wgmma accumulator [BKV, N]: warps stacked along the keys (16 each, a warpgroup per 64) in each of the
    column groups, one 64 x (N / groups) x 32 fp8 instruction per step and warpgroup."""
    g = _groups(n)
    return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps // g, g], instr_shape=[16, n // g, 32])


@gluon.constexpr_function
def _out_layout(bkv, bq, num_warps):
    """[BKV, BQ] scores with the keys fastest: each warp stores runs of consecutive keys of one query row."""
    spt = max(1, min(4, bkv * bq // (32 * num_warps)))
    tpw0 = min(32, bkv // spt)
    wpc0 = max(1, min(num_warps, bkv // (spt * tpw0)))
    return gl.BlockedLayout([spt, 1], [tpw0, 32 // tpw0], [wpc0, num_warps // wpc0], [0, 1])


@gluon.jit
def _load_partition(q_desc, k_desc, q_smem, k_bufs, q_bar, ready, empty, qrow0, lo_t, n_tiles,
                    NUM_STAGES: gl.constexpr):
    """Producer (1 warp): the q tile once, then key tile i into stage i % NUM_STAGES once the consumer released
    it. A fresh mbarrier counts as having completed the phase before phase 0, so the first pass over the ring
    waits for parity 1 and goes straight through."""
    BKV: gl.constexpr = k_desc.block_type.shape[0]
    if n_tiles > 0:
        mbarrier.expect(q_bar, q_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(q_desc, [qrow0, 0], q_bar, q_smem)
    for i in range(n_tiles):
        s = i % NUM_STAGES
        mbarrier.wait(empty.index(s), ((i // NUM_STAGES) & 1) ^ 1)
        bar = ready.index(s)
        mbarrier.expect(bar, k_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(k_desc, [lo_t + i * BKV, 0], bar, k_bufs.index(s))


@gluon.jit
def _issue(k_bufs, q_smem, ready, ks_ptr, i, lo_t, S, acc, NUM_STAGES: gl.constexpr, KL: gl.constexpr):
    """Wait for key tile i, start its MMA and load its key scales (used when the tile is reduced). ``acc`` is
    the accumulator whose registers the MMA takes (use_acc=False: its values are ignored): the tile reduced
    just before, so its reduction is ordered before this issue and no registers are copied."""
    BKV: gl.constexpr = k_bufs.type.shape[1]
    s = i % NUM_STAGES
    mbarrier.wait(ready.index(s), (i // NUM_STAGES) & 1)
    d = warpgroup_mma(k_bufs.index(s), q_smem.permute((1, 0)), acc, use_acc=False, is_async=True)
    keys = lo_t + i * BKV + gl.arange(0, BKV, layout=KL)
    ks = gl.load(ks_ptr + keys, mask=keys < S, other=0.0)
    return d, ks


@gluon.jit
def _head_sum(p, H: gl.constexpr, BQ: gl.constexpr):
    """[BKV, N] -> [BKV, BQ]: the sum over each query row's heads, columns in the q tile's order (G column
    groups of BQS = BQ / G rows; in a group n = (j * BQS + q) * 2 + e for head h = 2j + e, see ``_permute_q``)."""
    BKV: gl.constexpr = p.type.shape[0]
    G: gl.constexpr = _groups(BQ * H)
    BQS: gl.constexpr = BQ // G
    # one sum over [BKV, BQ, H] (a chain of fused multiply-adds with the weights) rather than nested ones
    heads = gl.permute(gl.reshape(p, [BKV, G, H // 2, BQS, 2]), [0, 1, 3, 2, 4])
    return gl.sum(gl.reshape(heads, [BKV, BQ, H]), axis=2)


@gluon.jit
def _reduce_store(d, ks, empty, i, wv, rs, re, out_rows, rmask, lo_t, S, H: gl.constexpr,
                  OUTSTANDING: gl.constexpr, NUM_STAGES: gl.constexpr, EVICT_FIRST: gl.constexpr):
    """Wait for tile i's MMA (OUTSTANDING later ones may still run), hand its stage back to the producer, then
    k_scale * sum_h w * relu(acc) per (key, query row), -inf outside the row's window, stored from the
    registers that hold it (lane bits 0-1 pick the query row: 8 consecutive keys a row, 32 bytes, per store
    instruction). Returns the accumulator (its registers go to the MMA issued next)."""
    d = warpgroup_mma_wait(num_outstanding=OUTSTANDING, deps=(d, ))
    BKV: gl.constexpr = d.type.shape[0]
    N: gl.constexpr = d.type.shape[1]
    BQ: gl.constexpr = N // H
    mbarrier.arrive(empty.index(i % NUM_STAGES), count=1)
    lg = _head_sum(gl.maximum(d, 0.0) * gl.expand_dims(wv, 0), H, BQ)  # [BKV, BQ]
    KQ: gl.constexpr = lg.type.layout
    ks = gl.convert_layout(ks, gl.SliceLayout(1, KQ))  # the same rows: no data moves
    keys = lo_t + i * BKV + gl.arange(0, BKV, layout=gl.SliceLayout(1, KQ))
    k2 = gl.expand_dims(keys, 1)
    ok = (k2 >= gl.expand_dims(rs, 0)) & (k2 < gl.expand_dims(re, 0))
    lg = gl.where(ok, lg * gl.expand_dims(ks, 1), float("-inf"))
    if EVICT_FIRST:  # the logits stream out: L2 keeps the keys that every program re-reads
        gl.store(out_rows + k2, lg, mask=gl.expand_dims(rmask, 0) & (k2 < S), eviction_policy="evict_first")
    else:
        gl.store(out_rows + k2, lg, mask=gl.expand_dims(rmask, 0) & (k2 < S))
    return d


@gluon.jit
def _fill(out_rows, rmask, c0, c1, S, BKV: gl.constexpr, OUT: gl.constexpr):
    """-inf at columns [c0, c1) of the program's rows (c0 a multiple of BKV; columns past S skipped)."""
    BQ: gl.constexpr = out_rows.type.shape[1]
    ninf = gl.full([BKV, BQ], float("-inf"), gl.float32, OUT)
    for c in range(c0, c1, BKV):
        k2 = gl.expand_dims(c + gl.arange(0, BKV, layout=gl.SliceLayout(1, OUT)), 1)
        gl.store(out_rows + k2, ninf, mask=gl.expand_dims(rmask, 0) & (k2 < S))


@gluon.jit
def _mma_partition(k_bufs, q_smem, q_bar, ready, empty, w_ptr, ks_ptr, rs_ptr, re_ptr, out_ptr, q0, T, S,
                   stride_out, lo_t, n_tiles, H: gl.constexpr, NUM_STAGES: gl.constexpr, MMA: gl.constexpr,
                   OUT: gl.constexpr, EVICT_FIRST: gl.constexpr):
    """Consumer: tile j+1's wgmma in flight while tile j is reduced (wait_group 1). Tiles go two at a time
    (x: even, y: odd) so that the value carried round the loop is the MMA issued last in the body."""
    BKV: gl.constexpr = k_bufs.type.shape[1]
    N: gl.constexpr = q_smem.type.shape[0]
    BQ: gl.constexpr = N // H
    # -inf left of the first tile and right of the last, stored through a plain blocked layout
    rows_o = q0 + gl.arange(0, BQ, layout=gl.SliceLayout(0, OUT))
    rmask_o = rows_o < T
    out_o = out_ptr + gl.expand_dims(rows_o.to(gl.int64) * stride_out, 0)  # [1, BQ]
    hi_t = lo_t + n_tiles * BKV
    _fill(out_o, rmask_o, 0, lo_t, S, BKV, OUT)
    if n_tiles > 0:
        # the reduced tiles' layout, from a reduction of zeros (once)
        KQ: gl.constexpr = _head_sum(gl.zeros([BKV, N], gl.float32, MMA), H, BQ).type.layout
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
        dy = gl.zeros([BKV, N], gl.float32, MMA)
        dx, kx = _issue(k_bufs, q_smem, ready, ks_ptr, 0, lo_t, S, gl.zeros([BKV, N], gl.float32, MMA),
                        NUM_STAGES, KL)
        for j in range((n_tiles - 1) // 2):  # at the loop head: tile i (even) in flight in x
            i = 2 * j
            dy, ky = _issue(k_bufs, q_smem, ready, ks_ptr, i + 1, lo_t, S, dy, NUM_STAGES, KL)
            dx = _reduce_store(dx, kx, empty, i, wv, rs, re, out_rows, rmask, lo_t, S, H, 1,
                               NUM_STAGES, EVICT_FIRST)
            dx, kx = _issue(k_bufs, q_smem, ready, ks_ptr, i + 2, lo_t, S, dx, NUM_STAGES, KL)
            dy = _reduce_store(dy, ky, empty, i + 1, wv, rs, re, out_rows, rmask, lo_t, S, H, 1,
                               NUM_STAGES, EVICT_FIRST)
        last = ((n_tiles - 1) // 2) * 2  # the tile in x
        if last + 1 < n_tiles:  # an even number of tiles: one more in y
            ey, ky = _issue(k_bufs, q_smem, ready, ks_ptr, last + 1, lo_t, S, dy, NUM_STAGES, KL)
            _reduce_store(dx, kx, empty, last, wv, rs, re, out_rows, rmask, lo_t, S, H, 1,
                          NUM_STAGES, EVICT_FIRST)
            _reduce_store(ey, ky, empty, last + 1, wv, rs, re, out_rows, rmask, lo_t, S, H, 0,
                          NUM_STAGES, EVICT_FIRST)
        else:
            _reduce_store(dx, kx, empty, last, wv, rs, re, out_rows, rmask, lo_t, S, H, 0,
                          NUM_STAGES, EVICT_FIRST)
    _fill(out_o, rmask_o, hi_t, S, S, BKV, OUT)


# chunk shapes vary (T, S and the output's row stride): one compile per head count and config
@gluon.jit(do_not_specialize=["T", "S", "stride_out"])
def _logits_ws_kernel(q_desc, k_desc, w_ptr, ks_ptr, rs_ptr, re_ptr, out_ptr, T, S, stride_out,
                      H: gl.constexpr, NUM_STAGES: gl.constexpr, EVICT_FIRST: gl.constexpr, num_warps: gl.constexpr):
    """Programs run last-first: in a causal prefill the last rows have the longest windows, and starting them
    first shortens the tail of the grid."""
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
        (_mma_partition, (k_bufs, q_smem, q_bar, ready, empty, w_ptr, ks_ptr, rs_ptr, re_ptr, out_ptr, q0, T, S,
                          stride_out, lo_t, n_tiles, H, NUM_STAGES, MMA, OUT, EVICT_FIRST)),
        (_load_partition, (q_desc, k_desc, q_smem, k_bufs, q_bar, ready, empty, q0 * H, lo_t, n_tiles,
                           NUM_STAGES)),
    ], [1], [40])


def operand_layouts(n: int, bkv: int):
    """Shared-memory layouts of the q tile [N, 128] and a key tile [BKV, 128] (128-byte swizzle: rows of 128
    fp8)."""
    return (gl.NVMMASharedLayout.get_default_for([n, D], gl.float8e4nv),
            gl.NVMMASharedLayout.get_default_for([bkv, D], gl.float8e4nv))


def _permute_q(q_fp8, bq: int):
    """q [T, H, 128] -> the programs' q tiles [ceil(T/BQ) * BQ*H, 128] (rows past T zero), each a run of column
    groups of BQS = BQ / column_groups(BQ*H) query rows, whose rows go in the order n = (j * BQS + q) * 2 + e
    for query row q and head h = 2j + e. The wgmma accumulator gives each lane of a quad the column pairs
    8m + 2 * (lane % 4) + {0, 1} of its warpgroup's columns: in this order the lane bits pick the query row,
    and a thread holds H / 2 or more of its row's heads, so the head sum is a sum in registers (and at most one
    shuffle at H=64) instead of a reduction across the quad or across warpgroups."""
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


def check_gluon_config(h: int, cfg: dict):
    bq, nw = cfg["BQ"], cfg["num_warps"]
    if h & (h - 1) or not 2 <= h <= 128 or bq & (bq - 1) or not 64 <= bq * h <= 256:
        raise ValueError(f"indexer_logits_gluon: H (2..128) and BQ must be powers of two with BQ*H in [64, 256] "
                         f"MMA columns, got H={h}, BQ={bq}")
    if nw not in (4, 8) or nw < 4 * column_groups(bq * h):
        raise ValueError(f"indexer_logits_gluon: num_warps must be 4 or 8 (a warpgroup per 64 keys and 128 MMA "
                         f"columns), and 8 for BQ*H = 256; got {nw} at BQ*H = {bq * h}")


def indexer_logits_gluon(q_fp8, w, k_fp8, k_scale, row_start, row_end, *, out=None, config=None):
    """``indexer_logits_triton``'s contract (inputs already checked by ``indexer_logits``) on Hopper.
    ``config``: BQ, num_warps, num_stages, maxnreg, evict_first (see ``config_for``)."""
    t, h, _ = q_fp8.shape
    s = k_fp8.shape[0]
    cfg = config_for(h)
    unknown = sorted(set(config or {}) - set(cfg))
    if unknown:
        raise ValueError(f"indexer_logits_gluon: unknown config keys {unknown}; the keys are {sorted(cfg)}")
    cfg.update(config or {})
    check_gluon_config(h, cfg)
    if not q_fp8.is_cuda:
        raise ValueError(f"indexer_logits_gluon: needs CUDA tensors (Gluon has no CPU interpreter), got "
                         f"{q_fp8.device}")
    if out is None:
        out = torch.empty(t, s, device=q_fp8.device, dtype=torch.float32)
    if t == 0 or s == 0:
        out.fill_(float("-inf"))  # no keys: every window is empty
        return out
    bq, nw = cfg["BQ"], cfg["num_warps"]
    q2 = _permute_q(q_fp8, bq)
    k2 = k_fp8.contiguous()
    if k2.data_ptr() % 16:  # a row slice of keys starts at a multiple of 128 bytes; only an odd view fails
        k2 = k2.clone()
    n = bq * h
    bkv = 16 * nw // column_groups(n)
    q_layout, k_layout = operand_layouts(n, bkv)
    q_desc = TensorDescriptor.from_tensor(q2, [n, D], q_layout)
    k_desc = TensorDescriptor.from_tensor(k2, [bkv, D], k_layout)
    grid = (triton.cdiv(t, bq),)
    _logits_ws_kernel[grid](q_desc, k_desc, w.contiguous(), k_scale.contiguous(), row_start.contiguous(),
                            row_end.contiguous(), out, t, s, out.stride(0), H=h, NUM_STAGES=cfg["num_stages"],
                            EVICT_FIRST=bool(cfg["evict_first"]), num_warps=nw, maxnreg=cfg["maxnreg"])
    return out
