"""Gluon (Triton's explicit-layout dialect) sparse MLA prefill from the FP8 latent cache for Hopper (sm_90a):
``sparse_mla_prefill(kv_format="fp8")``'s contract with the row gathers pipelined in a shared-memory ring and
the tensor-core work overlapped with the dequantisation (``sparse_mla_prefill(..., backend="gluon")``).

Why: the Triton FP8 kernel keeps one buffer of gathered rows, so each 656-B row gather waits in full before its
MMAs (and at 20 heads the MMAs are mma.sync-sized). Here one program (one warpgroup) owns one query and HP = 16
or 32 heads (20 heads: 32, zero-padded) and walks its top-k list in tiles of BT = 64 rows:
- ring: the e4m3 bytes [BT, 512], the bf16 rope [BT, 64] and the four fp32 scales [BT, 4] of tile i are
  gathered with cp.async (``async_copy_global_to_shared`` on pointers built from idx, one commit group a tile)
  into stage i % NUM_STAGES (3), up to NUM_STAGES - 1 tiles ahead of the tile being computed (invalid rows:
  masked copies, i.e. zero-filled);
- dequantise: the e4m3 bytes become fp16 in one [BT, 512] buffer, each 128-tile times c_g / cmax (c_g its
  power-of-two scale, cmax the row's largest of the four): exact in fp16 while a row's tile scales lie within
  2^15 of each other (one cvt + one mul per two values); cmax is applied per row after the MMAs;
- token-major wgmma (the 20 heads are the small N dimension): S^T [BT, HP] = KV16 [BT, 512] . Q16^T (q times
  one power of two qs that puts the largest |q| of the program's heads in [2^14, 2^15), fp16), plus the rope
  part KPE [BT, 64] . QPE^T in bf16 into its own accumulator; then an exp2 online softmax per head (column);
- PV: O^T [512, HP] += KV16^T [512, BT] . P^T [BT, HP], P^T = p * cmax / R in fp16 through shared memory (in
  the tile's e4m3 stage, free by then; R: the running max of cmax, a power of two). The running max m and R
  move only when a head's max grows by more than 2^8 or a row scale exceeds R (then O^T is rescaled by
  alpha * R_old / R_new); otherwise p <= 2^8 against the old m, exact, and O^T is left alone (``_softmax_step``);
- overlap: tile i's PV wgmma stays in flight into tile i+1 (its wait, scales and first 128-tile conversion run
  under it), and QK over dims 0-255 runs while dims 256-511 are converted (``_sparse_mla_prefill_fp8_gluon_kernel``).
All scalings are powers of two. Rows with no valid index give out 0 and lse -inf (the Triton kernels' rule).
Shared memory at 3 stages and HP 32: 229376 B of the SM's 232448 (ring 3 x 41 KB, fp16 tile 64 KB, q 36 KB).

A "serial" schedule (each tile's MMAs waited for before the next step; the cp.async ring alone overlapping loads
with compute) was measured slower on the H200 (run 77, 8192 queries, 200K context, top-k 2048, 20 heads, ms random /
mix index sets: 9.49 / 9.05 at 3 stages, 9.63 / 9.08 at 2, against 8.70 / 8.58 here) and was removed.

Limits (checked by the launcher): CUDA tensors on sm_90 (Gluon has no interpreter); q [T, H, 576] of any float
dtype; more than 32 heads run as head blocks of 32 that each gather the rows again (the 128-head model is not
this kernel's target). Compiles without a GPU (``python -m tests.kernels.sm90_compile --sparse-mla-gluon``:
registers, spills, shared memory, wgmma and the main loop's cp.async waits).
"""
from __future__ import annotations

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy as cp
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, warpgroup_mma,
                                                               warpgroup_mma_wait)

from indexcache.kernels import formats as F

# the CTA-wide thread barrier: ``gl.barrier`` from Triton 3.7, ``gl.thread_barrier`` before (3.6, the GPU's);
# both lower to the same debug_barrier (bar.sync 0). 3.6's shared-memory hazard analysis does not tell slices of
# one buffer apart, so it adds 3 bar.sync a tile (between the fp16 tile's 128-column stores); same results
_cta_barrier = getattr(gl, "barrier", None) or gl.thread_barrier

BT = 64          # rows a tile: the m64 of one warpgroup's wgmma (tokens are the MMA rows)
NUM_WARPS = 4    # one warpgroup
_ROW: gl.constexpr = gl.constexpr(F.LATENT_FP8_BYTES)
_ROW_F32: gl.constexpr = gl.constexpr(F.LATENT_FP8_BYTES // 4)
_ROW_BF16: gl.constexpr = gl.constexpr(F.LATENT_FP8_BYTES // 2)
_SCALES_F32: gl.constexpr = gl.constexpr(F.LATENT_SCALES_AT // 4)
_ROPE_BF16: gl.constexpr = gl.constexpr(F.LATENT_ROPE_AT // 2)


# tiles in the ring (40.3 KB each): 3 + the fp16 tile + q fit the 227 KB of an SM; fewer leave none in flight
# while a tile is computed (its stage is refilled only after its PV: NUM_STAGES - 2 in flight at a tile's top)
NUM_STAGES = 3


def heads_per_program(h: int) -> int:
    return 16 if h <= 16 else 32


@gluon.constexpr_function
def _mma_layout(hp):
    return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, hp, 16])


@gluon.constexpr_function
def _scales_row_layout():
    """[BT, 4] scales with the rows of the MMA accumulator (SliceLayout(1, _mma_layout(hp)), any hp): a row's four
    scales in one thread, rows over lane bits 2-4 (1, 2, 4), a register bit (8) and the warps (16, 32); lane bits
    0-1 repeat. A row max of it is already in the accumulator's row layout (no conversion)."""
    return gl.DistributedLinearLayout(reg_bases=[[0, 1], [0, 2], [8, 0]],
                                      lane_bases=[[0, 0], [0, 0], [1, 0], [2, 0], [4, 0]],
                                      warp_bases=[[16, 0], [32, 0]], block_bases=[], shape=[64, 4])


@gluon.jit
def _row_cmax(sc_ring, s, ROWL: gl.constexpr):
    """Stage s's largest tile scale per row, read in the accumulator's row layout ROWL."""
    c = sc_ring.index(s).load(_scales_row_layout())
    return gl.convert_layout(gl.max(c, axis=1), ROWL, assert_trivial=True)


@gluon.jit
def _load_ids(idx_row, j, topk, S, LAYOUT: gl.constexpr):
    """Row ids of tile j (positions past topk: -1) and their validity, in LAYOUT (a 1-D slice layout)."""
    pos = j * 64 + gl.arange(0, 64, layout=LAYOUT)
    ids = gl.load(idx_row + pos, mask=pos < topk, other=-1)
    return ids, (ids >= 0) & (ids < S)


@gluon.jit
def _issue(kv_u8, nope_ring, kpe_ring, sc_ring, s, ids_g, ok_g,
           GL: gl.constexpr, RL: gl.constexpr, SL: gl.constexpr):
    """cp.async of one tile's rows (ids_g / ok_g in SliceLayout(1, GL)) into stage s: masked (invalid) rows are
    zero-filled."""
    rows = gl.where(ok_g, ids_g, 0).to(gl.int64)
    c = gl.arange(0, 512, layout=gl.SliceLayout(0, GL))
    cp.async_copy_global_to_shared(nope_ring.index(s), kv_u8 + gl.expand_dims(rows * _ROW, 1) + gl.expand_dims(c, 0),
                                   mask=gl.expand_dims(ok_g, 1))
    rr = gl.convert_layout(rows, gl.SliceLayout(1, RL))
    rm = gl.convert_layout(ok_g, gl.SliceLayout(1, RL))
    cr = gl.arange(0, 64, layout=gl.SliceLayout(0, RL))
    kv_bf16 = kv_u8.to(gl.pointer_type(gl.bfloat16), bitcast=True)     # views of the one cache pointer (fewer
    kv_f32 = kv_u8.to(gl.pointer_type(gl.float32), bitcast=True)       # registers held through the loop)
    cp.async_copy_global_to_shared(kpe_ring.index(s), kv_bf16 + gl.expand_dims(rr * _ROW_BF16 + _ROPE_BF16, 1)
                                   + gl.expand_dims(cr, 0), mask=gl.expand_dims(rm, 1))
    rs = gl.convert_layout(rows, gl.SliceLayout(1, SL))
    ms = gl.convert_layout(ok_g, gl.SliceLayout(1, SL))
    cs = gl.arange(0, 4, layout=gl.SliceLayout(0, SL))
    cp.async_copy_global_to_shared(sc_ring.index(s), kv_f32 + gl.expand_dims(rs * _ROW_F32 + _SCALES_F32, 1)
                                   + gl.expand_dims(cs, 0), mask=gl.expand_dims(ms, 1))


@gluon.jit
def _prepare_q(q_row, sq_h, hb, q16_smem, qpe_smem, HP: gl.constexpr):
    """q of the program's heads (rows past hb zero) -> q16_smem [HP, 512] fp16 (times qs, a power of two that
    puts the largest |q| of all the heads in [2^14, 2^15): 28 binades below it stay normal fp16) and qpe_smem
    [HP, 64] bf16. Returns 1 / qs."""
    QL: gl.constexpr = gl.BlockedLayout([1, 8], [2, 16], [4, 1], [1, 0])
    hh = gl.arange(0, HP, layout=gl.SliceLayout(1, QL))
    d = gl.arange(0, 128, layout=gl.SliceLayout(0, QL))
    hm = gl.expand_dims(hh < hb, 1)
    ptr = q_row + gl.expand_dims(hh * sq_h, 1) + gl.expand_dims(d, 0)
    qmax = gl.zeros([HP], gl.float32, gl.SliceLayout(1, QL))
    for g in gl.static_range(4):
        x = gl.load(ptr + g * 128, mask=hm, other=0.0).to(gl.float32)
        qmax = gl.maximum(qmax, gl.max(gl.abs(x), axis=1))
    qm = gl.max(qmax, axis=0)
    qe = gl.where(qm > 0, gl.floor(gl.log2(gl.where(qm > 0, qm, 1.0))), 0.0)
    qe = gl.minimum(gl.maximum(qe, -100.0), 100.0)
    qs = gl.exp2(14.0 - qe)
    for g in gl.static_range(4):
        x = gl.load(ptr + g * 128, mask=hm, other=0.0).to(gl.float32)
        q16_smem.slice(g * 128, 128, dim=1).store((x * qs).to(gl.float16))
    RL: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [4, 1], [1, 0])
    hr = gl.arange(0, HP, layout=gl.SliceLayout(1, RL))
    dr = gl.arange(0, 64, layout=gl.SliceLayout(0, RL))
    xr = gl.load(q_row + gl.expand_dims(hr * sq_h + 512, 1) + gl.expand_dims(dr, 0),
                 mask=gl.expand_dims(hr < hb, 1), other=0.0)
    qpe_smem.store(xr.to(gl.float32).to(gl.bfloat16))
    return gl.exp2(qe - 14.0)


@gluon.jit
def _dq_factors(sc_ring, s, SCL: gl.constexpr):
    """Stage s's scales: (cmax [BT] per row, f [BT, 4] = c_g / cmax; both 0 where cmax = 0), SCL rows."""
    c = sc_ring.index(s).load(SCL)                                       # [BT, 4] fp32
    cmax = gl.max(c, axis=1)
    inv = gl.where(cmax > 0, gl.div_rn(gl.full_like(cmax, 1.0), gl.where(cmax > 0, cmax, 1.0)), 0.0)
    return cmax, c * gl.expand_dims(inv, 1)                              # powers of two: exact


@gluon.jit
def _dq_group(nope_ring, s, f, g: gl.constexpr, GL: gl.constexpr, SCL: gl.constexpr):
    """128-tile g of stage s as fp16 [BT, 128] in GL: e4m3 (one cvt per two) times c_g / cmax."""
    col = gl.expand_dims(gl.arange(0, 4, layout=gl.SliceLayout(0, SCL)), 0)
    fg = gl.max(gl.where(col == g, f, 0.0), axis=1)       # a max, not a sum: SCL repeats each row over 8 lanes
    fg = gl.convert_layout(fg, gl.SliceLayout(1, GL)).to(gl.float16)
    raw = nope_ring.index(s).slice(g * 128, 128, dim=1).load(GL)         # [BT, 128] uint8
    return raw.to(gl.float8e4nv, bitcast=True).to(gl.float16) * gl.expand_dims(fg, 1)


@gluon.jit
def _max2(a, b, c, d):
    return gl.maximum(a, c), gl.maximum(b, d)


@gluon.jit
def _softmax_step(acc, accr, cm, ok, nope_scale, qk_scale, m_i, l_i, r_i):
    """One tile's exp2 online softmax per head (column) of S^T. Returns P^T (fp16, p * cm / r_new <= 2^8), the
    factor of the running O^T (alpha * r_old / r_new, per head), whether O^T needs it (``rescale``; else the
    factor is 1 for every head), and the new m, l, r.
    The running max m (all heads) and R move only when some head's max grew by more than 2^8 or a row scale
    exceeds R: otherwise p <= 2^8 against the old m (exact: m only has to be a common shift per head, l uses
    the same one) and the 128 multiplies of O^T a tile are skipped."""
    sc = acc * gl.expand_dims(cm * nope_scale, 1) + accr * qk_scale
    sc = gl.where(gl.expand_dims(ok, 1), sc, float("-inf"))
    # the column max of S^T and the tile's largest row scale in one cross-warp reduction (one barrier round)
    cmv = gl.where(gl.expand_dims(ok, 1), gl.expand_dims(cm, 1), 0.0) + gl.zeros_like(sc)
    smax, cmx = gl.reduce((sc, cmv), 0, _max2)
    m_cand = gl.maximum(m_i, smax)
    r_cand = gl.maximum(r_i, gl.max(cmx, axis=0))                # cmx: the same value in every column
    # -inf - -inf (no valid row yet) is NaN: compares false, nothing to rescale
    grown = gl.max(gl.where(m_cand - m_i > 8.0, 1, 0), axis=0)
    rescale = (grown > 0) | (r_cand > r_i)
    m_new = gl.where(rescale, m_cand, m_i)
    r_new = gl.where(rescale, r_cand, r_i)
    m_use = gl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = gl.exp2(m_i - m_use)
    p = gl.exp2(sc - gl.expand_dims(m_use, 0))
    l_new = l_i * alpha + gl.sum(p, axis=0)
    inv_r = gl.div_rn(1.0, r_new)
    pt = (p * gl.expand_dims(cm * inv_r, 1)).to(gl.float16)
    return pt, alpha * (r_i * inv_r), rescale, m_new, l_new, r_new


@gluon.jit
def _store_out(o, inv, buf, out_row, so_h, hb, HP: gl.constexpr):
    """O^T [512, HP] times inv (per head) -> out[t, h, :] through ``buf`` (the free fp16 tile, 64 KB, seen as fp32
    [512, HP]), read back 128 dims at a time as 16-byte runs along the dims (a whole-tile layout conversion in
    registers spills with fp32 outputs)."""
    plain: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [1, 0])
    ob = buf._reinterpret(gl.float32, [512, HP], plain)
    ob.store(o * gl.expand_dims(inv, 0))
    _cta_barrier()
    OL: gl.constexpr = gl.BlockedLayout([4, 1], [32, 1], [1, 4], [0, 1])
    ho = gl.arange(0, HP, layout=gl.SliceLayout(0, OL))
    hm = gl.expand_dims(ho < hb, 0)
    for c in gl.static_range(4):
        d = c * 128 + gl.arange(0, 128, layout=gl.SliceLayout(1, OL))
        v = ob.slice(c * 128, 128, dim=0).load(OL)
        gl.store(out_row + gl.expand_dims(ho * so_h, 0) + gl.expand_dims(d, 1), v.to(out_row.dtype.element_ty),
                 mask=hm)


@gluon.jit(do_not_specialize=["S", "topk"])
def _sparse_mla_prefill_fp8_gluon_kernel(q, kv_u8, idx, out, lse, S, H, topk, qk_scale,
                                         sq_t, sq_h, si_t, so_t, so_h, HP: gl.constexpr,
                                         NUM_STAGES: gl.constexpr, num_warps: gl.constexpr):
    """One program: query t, heads h0 .. h0 + HP - 1; the tensor-core work overlapped with the dequantisation:
    - tile i's PV wgmma is left running round the loop (the value carried is that MMA, never a copy); tile i+1's
      wait for its rows, its scales and first 128-tile conversion run meanwhile;
    - only after PV(i) is tile i's e4m3 stage (which held P^T(i)) refilled, so the ring holds NUM_STAGES - 2
      tiles in flight at the top of an iteration and NUM_STAGES - 1 after the refill;
    - QK over dims 0-255 runs while the last two 128-tiles are converted into dims 256-511, then QK over those
      and the rope part are chained onto it."""
    t = gl.program_id(0).to(gl.int64)
    h0 = gl.program_id(1) * HP
    hb = H - h0
    MMA: gl.constexpr = _mma_layout(HP)
    ROWL: gl.constexpr = gl.SliceLayout(1, MMA)      # per token of S^T, per dim of O^T
    COLL: gl.constexpr = gl.SliceLayout(0, MMA)      # per head
    GL: gl.constexpr = gl.BlockedLayout([1, 16], [4, 8], [4, 1], [1, 0])    # [BT, 128] bytes: 16 B a thread
    RL: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [4, 1], [1, 0])     # [BT, 64] bf16: same rows as GL
    SCL: gl.constexpr = gl.BlockedLayout([1, 4], [4, 8], [4, 1], [1, 0])    # [BT, 4] fp32: GL's rows

    plain: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [1, 0])
    # e4m3 rows, 128-byte swizzled (an MMA layout, so the stage is aligned for P^T, which reuses it: see below)
    nope_ring = gl.allocate_shared_memory(gl.uint8, [NUM_STAGES, 64, 512],
                                          gl.NVMMASharedLayout.get_default_for([64, 512], gl.uint8))
    kpe_ring = gl.allocate_shared_memory(gl.bfloat16, [NUM_STAGES, 64, 64],
                                         gl.NVMMASharedLayout.get_default_for([64, 64], gl.bfloat16))
    sc_ring = gl.allocate_shared_memory(gl.float32, [NUM_STAGES, 64, 4], plain)
    # single buffers with a leading dim of 1, indexed in the loop by a value the compiler cannot prove is 0: the
    # ~70 wgmma shared-memory descriptors are then rebuilt each tile (a few uniform adds) instead of being
    # hoisted out of the loop into ~140 registers (which spilled)
    kv16_all = gl.allocate_shared_memory(gl.float16, [1, 64, 512],
                                         gl.NVMMASharedLayout.get_default_for([64, 512], gl.float16))
    q16_all = gl.allocate_shared_memory(gl.float16, [1, HP, 512],
                                        gl.NVMMASharedLayout.get_default_for([HP, 512], gl.float16))
    qpe_all = gl.allocate_shared_memory(gl.bfloat16, [1, HP, 64],
                                        gl.NVMMASharedLayout.get_default_for([HP, 64], gl.bfloat16))
    P_LAYOUT: gl.constexpr = gl.NVMMASharedLayout.get_default_for([64, HP], gl.float16)

    idx_row = idx + t * si_t
    n_tiles = gl.cdiv(topk, 64)
    # prologue: tiles 0 .. NUM_STAGES-2 in flight; the ids of the next tile to issue are loaded one step ahead
    ids_g, ok_g = _load_ids(idx_row, 0, topk, S, gl.SliceLayout(1, GL))
    for j in gl.static_range(NUM_STAGES - 1):
        _issue(kv_u8, nope_ring, kpe_ring, sc_ring, j, ids_g, ok_g, GL, RL, SCL)
        cp.commit_group()
        ids_g, ok_g = _load_ids(idx_row, j + 1, topk, S, gl.SliceLayout(1, GL))

    inv_qs = _prepare_q(q + t * sq_t + h0 * sq_h, sq_h, hb, q16_all.index(0), qpe_all.index(0), HP)
    nope_scale = inv_qs * qk_scale

    m_i = gl.full([HP], float("-inf"), gl.float32, COLL)
    l_i = gl.zeros([HP], gl.float32, COLL)
    r_i = 7.888609052210118e-31                                     # 2^-100: below any tile scale
    # O^T is carried round the loop as the PV wgmma in flight. ptxas serialises every wgmma (C7515) unless that
    # value comes from a wgmma on entry too: a PV of zeros (fp16 tile and P^T zeroed here) starts it
    ZL: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [4, 1], [1, 0])
    kv16_all.index(0).store(gl.zeros([64, 512], gl.float16, ZL))
    p0 = nope_ring.index(NUM_STAGES - 1)._reinterpret(gl.float16, [64, HP], P_LAYOUT)   # not in flight yet
    p0.store(gl.zeros([64, HP], gl.float16, ZL))
    fence_async_shared()                                            # also q16 / qpe before the first wgmma
    _cta_barrier()
    o = warpgroup_mma(kv16_all.index(0).permute((1, 0)), p0, gl.zeros([512, HP], gl.float32, MMA), use_acc=False,
                      is_async=True)
    for i in range(n_tiles):
        s = i % NUM_STAGES
        z = i >> 30                                                # 0 (i < 2^30): see kv16_all
        kv16 = kv16_all.index(z)
        kv_lo = kv16.slice(0, 256, dim=1)
        kv_hi = kv16.slice(256, 256, dim=1)
        q16 = q16_all.index(z)
        _, ok = _load_ids(idx_row, i, topk, S, ROWL)            # used at the softmax: latency hidden
        cp.wait_group(NUM_STAGES - 2)                              # tile i landed (this thread's copies)
        _cta_barrier()                                               # everyone's
        f = _dq_factors(sc_ring, s, SCL)[1]
        k0 = _dq_group(nope_ring, s, f, 0, GL, SCL)                # while PV(i-1) runs
        # PV(i-1) done: the fp16 tile and P^T(i-1) are free. k0 goes through the wait so that its conversion is
        # not sunk below it (next to the store)
        o, k0 = warpgroup_mma_wait(num_outstanding=0, deps=(o, k0))
        kv16.slice(0, 128, dim=1).store(k0)
        kv16.slice(128, 128, dim=1).store(_dq_group(nope_ring, s, f, 1, GL, SCL))
        fence_async_shared()
        _cta_barrier()
        # refill stage (i-1) % NUM_STAGES (it held P^T(i-1)) with tile i + NUM_STAGES - 1
        _issue(kv_u8, nope_ring, kpe_ring, sc_ring, (i + NUM_STAGES - 1) % NUM_STAGES, ids_g,
               ok_g, GL, RL, SCL)
        cp.commit_group()
        ids_g, ok_g = _load_ids(idx_row, i + NUM_STAGES, topk, S, gl.SliceLayout(1, GL))
        # both accumulators' registers are defined before the first MMA starts (ptxas serialises every wgmma
        # when a non-wgmma instruction defines accumulator registers while one is in flight)
        zero_s = gl.zeros([64, HP], gl.float32, MMA)
        accr = warpgroup_mma(kpe_ring.index(s), qpe_all.index(z).permute((1, 0)), zero_s, use_acc=False,
                             is_async=True)
        acc = warpgroup_mma(kv_lo, q16.slice(0, 256, dim=1).permute((1, 0)), zero_s, use_acc=False, is_async=True)
        kv16.slice(256, 128, dim=1).store(_dq_group(nope_ring, s, f, 2, GL, SCL))    # while QK_lo runs
        kv16.slice(384, 128, dim=1).store(_dq_group(nope_ring, s, f, 3, GL, SCL))
        fence_async_shared()
        _cta_barrier()
        acc = warpgroup_mma(kv_hi, q16.slice(256, 256, dim=1).permute((1, 0)), acc, is_async=True)
        accr, acc = warpgroup_mma_wait(num_outstanding=0, deps=(accr, acc))

        cm = _row_cmax(sc_ring, s, ROWL)
        pt, fo, rescale, m_i, l_i, r_i = _softmax_step(acc, accr, cm, ok, nope_scale, qk_scale, m_i, l_i, r_i)
        p_smem = nope_ring.index(s)._reinterpret(gl.float16, [64, HP], P_LAYOUT)
        p_smem.store(pt)
        fence_async_shared()
        _cta_barrier()
        if rescale:
            o = o * gl.expand_dims(fo, 0)
        o = warpgroup_mma(kv16.permute((1, 0)), p_smem, o, is_async=True)
    o = warpgroup_mma_wait(num_outstanding=0, deps=(o, ))
    cp.wait_group(0)

    hh = gl.arange(0, HP, layout=COLL)
    inv = gl.where(l_i > 0, r_i / gl.where(l_i > 0, l_i, 1.0), 0.0)
    out_row = out + t * so_t + h0 * so_h
    _store_out(o, inv, kv16_all.index(0), out_row, so_h, hb, HP)
    ls = gl.where(l_i > 0, (m_i + gl.log2(gl.where(l_i > 0, l_i, 1.0))) * 0.6931471805599453, float("-inf"))
    gl.store(lse + t * H + h0 + hh, ls, mask=hh < hb)


def sparse_mla_prefill_fp8_gluon(q, flat, indices, out, lse, sm_scale: float):
    """Launch on checked inputs (``ops._prefill_fp8_gluon``): q [T, H, 576] (last dim contiguous), flat uint8
    [S, 656] contiguous, indices [T, topk] int32 contiguous, out [T, H, 512] and lse [T, H] to fill."""
    T, H, _ = q.shape
    hp = heads_per_program(H)
    _sparse_mla_prefill_fp8_gluon_kernel[(T, triton.cdiv(H, hp))](
        q, flat, indices, out, lse, flat.shape[0], H,
        indices.shape[1], sm_scale * 1.4426950408889634, q.stride(0), q.stride(1), indices.stride(0),
        out.stride(0), out.stride(1), HP=hp, NUM_STAGES=NUM_STAGES, num_warps=NUM_WARPS)
    return out, lse
