"""Warp-specialised Gluon sparse MLA prefill from the FP8 latent cache (Hopper, sm_90a).

Same contract as ``gluon.py`` (``sparse_mla_prefill(kv_format="fp8")``), with the work of one query split over
three warpgroups that wait on each other through mbarriers instead of running one after another:
- loader (4 warps): gathers the 656-B rows of each 64-token tile with cp.async into a ring of NUM_STAGES stages
  (e4m3 [64, 512], bf16 rope [64, 64], fp32 scales [64, 4]) and marks a stage full when its copies landed;
- converter (4 warps): turns a full stage's e4m3 bytes into the fp16 tile PV reads (each 128-tile times c_g / cmax,
  exact powers of two; ``gluon._dq_group``), once the previous tile's PV has let go of it;
- consumer (the default partition, 4 warps): QK straight from the e4m3 bytes with fp8 wgmma: q times a power of
  two per head is split into two e4m3 parts (hi + lo: ~8 significant bits, bf16's precision), one accumulator per
  128-tile takes its row scale c_g afterwards; the bf16 rope part is its own wgmma. Then the exp2 online softmax
  (``gluon._softmax_core``), P^T (fp16, times cmax / R) into the stage's e4m3 bytes (read by then), and PV
  O^T [512, HP] += fp16 tile^T . P^T. After PV it hands the fp16 tile back to the converter and the stage back to
  the loader.
So the conversion of tile i+1 runs under QK and the softmax of tile i+1, and the gathers of later tiles under both.

Shared memory at 3 stages and HP 32: ring 3 x 41 KB, fp16 tile 64 KB, q hi / lo 32 KB, rope q 4 KB (~225 KB).
Limits as ``gluon.py``: sm_90 CUDA tensors, heads in blocks of 16 or 32 (each block gathers the rows again).
"""
from __future__ import annotations

import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy as cp
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, warpgroup_mma,
                                                               warpgroup_mma_wait)

from indexcache.kernels.sparse_mla.gluon import (_cta_barrier, _dq_factors, _dq_group, _issue, _load_ids,
                                                 _mma_layout, _scales_row_layout, _softmax_core, _store_out,
                                                 heads_per_program)

NUM_STAGES = 2      # with a P^T buffer of its own, three stages do not fit the 227 KB
NUM_WARPS = 4          # the consumer (default partition); the loader and the converter have 4 each
# registers a thread: consumer (O^T 128 + five [64, HP] QK accumulators), converter, loader (setmaxnreg; the three
# warpgroups share the SM's 64K)
CONVERTER_REGS = gl.constexpr(152)
LOADER_REGS = gl.constexpr(88)

_GL = gl.constexpr(gl.BlockedLayout([1, 16], [4, 8], [4, 1], [1, 0]))    # [64, 128] bytes: 16 B a thread
_RL = gl.constexpr(gl.BlockedLayout([1, 8], [4, 8], [4, 1], [1, 0]))     # [64, 64] bf16, GL's rows
_SCL = gl.constexpr(gl.BlockedLayout([1, 4], [4, 8], [4, 1], [1, 0]))    # [64, 4] fp32, GL's rows


@gluon.constexpr_function
def _mma8_layout(hp):
    """The fp8 QK accumulators [64, HP]: one 64 x HP x 32 e4m3 instruction a k-step (the same registers as the
    K = 16 layout of the fp16 / bf16 MMAs, ``gluon._mma_layout``)."""
    return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, hp, 32])


@gluon.jit
def _loader(kv_u8, idx_row, S, topk, nope_ring, kpe_ring, sc_ring, ring_full, ring_empty,
            NUM_STAGES: gl.constexpr):
    """Tiles 0 .. NUM_STAGES-2 first; then per tile j: wait for its copies (this thread's, then every loader
    thread's), mark stage j full; wait until tile j-1's PV has let go of its stage and gather tile
    j + NUM_STAGES - 1 into it. Tiles past the list are issued as all-masked copies (zero rows, never read), so
    every pass commits one group and the wait count stays NUM_STAGES - 2."""
    n_tiles = gl.cdiv(topk, 64)
    for j in gl.static_range(NUM_STAGES - 1):
        ids, ok = _load_ids(idx_row, j, topk, S, gl.SliceLayout(1, _GL))
        _issue(kv_u8, nope_ring, kpe_ring, sc_ring, j, ids, ok, _GL, _RL, _SCL)
        cp.commit_group()
    for j in range(n_tiles):
        cp.wait_group(NUM_STAGES - 2)
        fence_async_shared()                  # the copies, before the consumer's wgmma reads them
        _cta_barrier()                        # every loader thread's copies (a barrier of this warpgroup)
        mbarrier.arrive(ring_full.index(j % NUM_STAGES), count=1)
        jn = j + NUM_STAGES - 1
        sn = jn % NUM_STAGES
        # stage sn last held tile j - 1: its ((j - 1) // NUM_STAGES)-th use; free from the start when j = 0
        mbarrier.wait(ring_empty.index(sn), (gl.maximum(j - 1, 0) // NUM_STAGES) & 1, pred=j >= 1)
        ids, ok = _load_ids(idx_row, jn, topk, S, gl.SliceLayout(1, _GL))
        _issue(kv_u8, nope_ring, kpe_ring, sc_ring, sn, ids, ok, _GL, _RL, _SCL)
        cp.commit_group()
    cp.wait_group(0)


@gluon.jit
def _converter(topk, nope_ring, sc_ring, kv16, ring_full, fp16_full, fp16_empty, NUM_STAGES: gl.constexpr):
    """Per tile j: wait for stage j and for the fp16 tile (PV(j-1) done; a fresh barrier lets j = 0 through),
    write the fp16 tile, mark it full."""
    n_tiles = gl.cdiv(topk, 64)
    for j in range(n_tiles):
        s = j % NUM_STAGES
        mbarrier.wait(ring_full.index(s), (j // NUM_STAGES) & 1)
        mbarrier.wait(fp16_empty, (j & 1) ^ 1)
        f = _dq_factors(sc_ring, s, _SCL)[1]
        kv = kv16.index(j >> 30)                      # 0
        for g in gl.static_range(4):
            kv.slice(g * 128, 128, dim=1).store(_dq_group(nope_ring, s, f, g, _GL, _SCL))
        fence_async_shared()
        _cta_barrier()
        mbarrier.arrive(fp16_full, count=1)


@gluon.jit
def _prepare_q8(q_row, sq_h, hb, qhi, qlo, qpe_smem, HP: gl.constexpr, COLL: gl.constexpr):
    """q of the block's heads (rows past hb zero) times qs[h] = 2^(7 - e), e the exponent of max|q[h]| (largest
    |x| of a head in [128, 256); e4m3 tops out at 448), as hi = e4m3(x) and lo = e4m3(16 (x - hi)) into qhi / qlo
    [HP, 512]: exact for a bf16 q (8 significant bits: 4 in hi, the rest in lo) down to 2^-11 of a head's largest
    element. lo is scaled up and gets its own accumulators: added into hi's, its products would lose their low
    bits (the tensor core's fp8 accumulation keeps ~14 bits). The rope q in bf16 into qpe_smem [HP, 64].
    Returns 1 / qs per head (COLL). Scales from exponent bits, not exp2 / log2: exact powers of two."""
    QL: gl.constexpr = gl.BlockedLayout([1, 8], [2, 16], [4, 1], [1, 0])
    hh = gl.arange(0, HP, layout=gl.SliceLayout(1, QL))
    d = gl.arange(0, 128, layout=gl.SliceLayout(0, QL))
    hm = gl.expand_dims(hh < hb, 1)
    ptr = q_row + gl.expand_dims(hh * sq_h, 1) + gl.expand_dims(d, 0)
    qmax = gl.zeros([HP], gl.float32, gl.SliceLayout(1, QL))
    for g in gl.static_range(4):
        x = gl.load(ptr + g * 128, mask=hm, other=0.0).to(gl.float32)
        qmax = gl.maximum(qmax, gl.max(gl.abs(x), axis=1))
    e = ((qmax.to(gl.int32, bitcast=True) >> 23) & 255) - 127
    e = gl.minimum(gl.maximum(e, -100), 100)
    qs = gl.expand_dims(((134 - e) << 23).to(gl.float32, bitcast=True), 1)
    for g in gl.static_range(4):
        x = gl.load(ptr + g * 128, mask=hm, other=0.0).to(gl.float32) * qs
        hi = x.to(gl.float8e4nv)
        qhi.slice(g * 128, 128, dim=1).store(hi)
        qlo.slice(g * 128, 128, dim=1).store(((x - hi.to(gl.float32)) * 16.0).to(gl.float8e4nv))
    RL: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [4, 1], [1, 0])
    hr = gl.arange(0, HP, layout=gl.SliceLayout(1, RL))
    dr = gl.arange(0, 64, layout=gl.SliceLayout(0, RL))
    xr = gl.load(q_row + gl.expand_dims(hr * sq_h + 512, 1) + gl.expand_dims(dr, 0),
                 mask=gl.expand_dims(hr < hb, 1), other=0.0)
    qpe_smem.store(xr.to(gl.float32).to(gl.bfloat16))
    return gl.convert_layout(((120 + e) << 23).to(gl.float32, bitcast=True), COLL)


@gluon.jit
def _qk_pair(e8, qh, ql, g: gl.constexpr, zero):
    """The two 128-tiles g, g+1 of S^T as (hi, lo) accumulators each, started (not waited for)."""
    h0 = warpgroup_mma(e8.slice(g * 128, 128, dim=1), qh.slice(g * 128, 128, dim=1).permute((1, 0)), zero,
                       use_acc=False, is_async=True)
    l0 = warpgroup_mma(e8.slice(g * 128, 128, dim=1), ql.slice(g * 128, 128, dim=1).permute((1, 0)), zero,
                       use_acc=False, is_async=True)
    h1 = warpgroup_mma(e8.slice(g * 128 + 128, 128, dim=1), qh.slice(g * 128 + 128, 128, dim=1).permute((1, 0)),
                       zero, use_acc=False, is_async=True)
    l1 = warpgroup_mma(e8.slice(g * 128 + 128, 128, dim=1), ql.slice(g * 128 + 128, 128, dim=1).permute((1, 0)),
                       zero, use_acc=False, is_async=True)
    return h0, l0, h1, l1


@gluon.jit
def _scale_col(c, g: gl.constexpr, ROWL: gl.constexpr):
    """Column g of the [64, 4] scales (``_scales_row_layout``: a row's four in one thread) in ROWL."""
    col = gl.expand_dims(gl.arange(0, 4, layout=gl.SliceLayout(0, _scales_row_layout())), 0)
    return gl.convert_layout(gl.max(gl.where(col == g, c, 0.0), axis=1), ROWL, assert_trivial=True)


@gluon.jit
def _consumer(q, idx_row, out, lse, t, h0, S, H, topk, qk_scale, sq_t, sq_h, so_t, so_h,
              nope_ring, kpe_ring, sc_ring, kv16, qhi, qlo, qpe, pbuf, ring_full, ring_empty, fp16_full, fp16_empty,
              HP: gl.constexpr, NUM_STAGES: gl.constexpr):
    MMA: gl.constexpr = _mma_layout(HP)
    MMA8: gl.constexpr = _mma8_layout(HP)
    ROWL8: gl.constexpr = gl.SliceLayout(1, MMA8)
    ROWL: gl.constexpr = gl.SliceLayout(1, MMA)
    COLL: gl.constexpr = gl.SliceLayout(0, MMA)
    hb = H - h0
    inv_qs = _prepare_q8(q + t * sq_t + h0 * sq_h, sq_h, hb, qhi.index(0), qlo.index(0), qpe.index(0), HP, COLL)
    fence_async_shared()
    _cta_barrier()
    E8: gl.constexpr = gl.NVMMASharedLayout.get_default_for([64, 512], gl.float8e4nv)
    n_tiles = gl.cdiv(topk, 64)
    m_i = gl.full([HP], float("-inf"), gl.float32, COLL)
    l_i = gl.zeros([HP], gl.float32, COLL)
    r_i = 7.888609052210118e-31                                     # 2^-100: below any tile scale
    o = gl.zeros([512, HP], gl.float32, MMA)
    nope_q = gl.expand_dims(inv_qs * qk_scale, 0)
    rope_w = gl.expand_dims(gl.convert_layout(1.0 / inv_qs, gl.SliceLayout(0, MMA8)), 0)   # qs: a power of two
    for i in range(n_tiles):
        s = i % NUM_STAGES
        z = i >> 30                                   # 0: see the single buffers' allocation
        qh = qhi.index(z)
        ql = qlo.index(z)
        _, ok = _load_ids(idx_row, i, topk, S, ROWL)
        mbarrier.wait(ring_full.index(s), (i // NUM_STAGES) & 1)
        e8 = nope_ring.index(s)._reinterpret(gl.float8e4nv, [64, 512], E8)
        accr = warpgroup_mma(kpe_ring.index(s), qpe.index(z).permute((1, 0)), gl.zeros([64, HP], gl.float32, MMA),
                             use_acc=False, is_async=True)
        # two 128-tiles at a time: 4 accumulators of 16 registers beside O^T's 128; the rope part and the first
        # pair are folded into one [64, HP] sum (in units of the scaled q: rope_w = qs per head) before the second
        ha, la, hb1, lb1 = _qk_pair(e8, qh, ql, 0, gl.zeros([64, HP], gl.float32, MMA8))
        accr, ha, la, hb1, lb1 = warpgroup_mma_wait(num_outstanding=0, deps=(accr, ha, la, hb1, lb1))
        c = sc_ring.index(s).load(_scales_row_layout())
        sn = (gl.convert_layout(accr, MMA8) * rope_w + (ha + la * 0.0625) * gl.expand_dims(_scale_col(c, 0, ROWL8), 1)
              + (hb1 + lb1 * 0.0625) * gl.expand_dims(_scale_col(c, 1, ROWL8), 1))
        hc, lc, hd, ld = _qk_pair(e8, qh, ql, 2, gl.zeros([64, HP], gl.float32, MMA8))
        hc, lc, hd, ld = warpgroup_mma_wait(num_outstanding=0, deps=(hc, lc, hd, ld))
        c = sc_ring.index(s).load(_scales_row_layout())
        sn += ((hc + lc * 0.0625) * gl.expand_dims(_scale_col(c, 2, ROWL8), 1)
               + (hd + ld * 0.0625) * gl.expand_dims(_scale_col(c, 3, ROWL8), 1))
        sc = gl.convert_layout(sn, MMA) * nope_q
        cm = gl.convert_layout(gl.max(c, axis=1), ROWL, assert_trivial=True)
        pt, fo, rescale, m_i, l_i, r_i = _softmax_core(sc, cm, ok, m_i, l_i, r_i)
        # P^T in a buffer of its own (PV(i-1) is done with it): written into a ring stage reinterpreted as fp16
        # (the rope region or the e4m3 bytes, both read by then) it read back wrong on the H200 (Triton 3.6)
        p_smem = pbuf.index(z)
        p_smem.store(pt)
        fence_async_shared()
        _cta_barrier()
        mbarrier.wait(fp16_full, i & 1)
        if rescale:
            o = o * gl.expand_dims(fo, 0)
        o = warpgroup_mma(kv16.index(z).permute((1, 0)), p_smem, o, is_async=True)
        o = warpgroup_mma_wait(num_outstanding=0, deps=(o, ))
        mbarrier.arrive(fp16_empty, count=1)
        mbarrier.arrive(ring_empty.index(s), count=1)

    hh = gl.arange(0, HP, layout=COLL)
    inv = gl.where(l_i > 0, r_i / gl.where(l_i > 0, l_i, 1.0), 0.0)
    _store_out(o, inv, kv16.index(0), out + t * so_t + h0 * so_h, so_h, hb, HP)    # the converter is done with kv16
    ls = gl.where(l_i > 0, (m_i + gl.log2(gl.where(l_i > 0, l_i, 1.0))) * 0.6931471805599453, float("-inf"))
    gl.store(lse + t * H + h0 + hh, ls, mask=hh < hb)


@gluon.jit(do_not_specialize=["S", "topk"])
def _sparse_mla_prefill_fp8_ws_kernel(q, kv_u8, idx, out, lse, S, H, topk, qk_scale, sq_t, sq_h, si_t, so_t, so_h,
                                      HP: gl.constexpr, NUM_STAGES: gl.constexpr, num_warps: gl.constexpr):
    t = gl.program_id(0).to(gl.int64)
    h0 = gl.program_id(1) * HP
    plain: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [1, 0])
    nope_ring = gl.allocate_shared_memory(gl.uint8, [NUM_STAGES, 64, 512],
                                          gl.NVMMASharedLayout.get_default_for([64, 512], gl.uint8))
    kpe_ring = gl.allocate_shared_memory(gl.bfloat16, [NUM_STAGES, 64, 64],
                                         gl.NVMMASharedLayout.get_default_for([64, 64], gl.bfloat16))
    sc_ring = gl.allocate_shared_memory(gl.float32, [NUM_STAGES, 64, 4], plain)
    # single buffers with a leading dim of 1, indexed in the loops by a value the compiler cannot prove is 0, so
    # their wgmma descriptors are rebuilt each tile instead of hoisted into registers (they spilled)
    kv16 = gl.allocate_shared_memory(gl.float16, [1, 64, 512], gl.NVMMASharedLayout.get_default_for([64, 512],
                                                                                                      gl.float16))
    Q8: gl.constexpr = gl.NVMMASharedLayout.get_default_for([HP, 512], gl.float8e4nv)
    qhi = gl.allocate_shared_memory(gl.float8e4nv, [1, HP, 512], Q8)
    qlo = gl.allocate_shared_memory(gl.float8e4nv, [1, HP, 512], Q8)
    qpe = gl.allocate_shared_memory(gl.bfloat16, [1, HP, 64], gl.NVMMASharedLayout.get_default_for([HP, 64],
                                                                                                     gl.bfloat16))
    pbuf = gl.allocate_shared_memory(gl.float16, [1, 64, HP], gl.NVMMASharedLayout.get_default_for([64, HP],
                                                                                                   gl.float16))
    ring_full = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    ring_empty = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    fp16_full = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    fp16_empty = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    for s in gl.static_range(NUM_STAGES):
        mbarrier.init(ring_full.index(s), count=1)
        mbarrier.init(ring_empty.index(s), count=1)
    mbarrier.init(fp16_full, count=1)
    mbarrier.init(fp16_empty, count=1)
    idx_row = idx + t * si_t
    gl.warp_specialize([
        (_consumer, (q, idx_row, out, lse, t, h0, S, H, topk, qk_scale, sq_t, sq_h, so_t, so_h, nope_ring, kpe_ring,
                     sc_ring, kv16, qhi, qlo, qpe, pbuf, ring_full, ring_empty, fp16_full, fp16_empty, HP, NUM_STAGES)),
        (_converter, (topk, nope_ring, sc_ring, kv16, ring_full, fp16_full, fp16_empty, NUM_STAGES)),
        (_loader, (kv_u8, idx_row, S, topk, nope_ring, kpe_ring, sc_ring, ring_full, ring_empty, NUM_STAGES)),
    ], [4, 4], [CONVERTER_REGS, LOADER_REGS])


def sparse_mla_prefill_fp8_gluon_ws(q, flat, indices, out, lse, sm_scale: float):
    """Launch on checked inputs (as ``gluon.sparse_mla_prefill_fp8_gluon``)."""
    T, H, _ = q.shape
    hp = heads_per_program(H)
    _sparse_mla_prefill_fp8_ws_kernel[(T, triton.cdiv(H, hp))](
        q, flat, indices, out, lse, flat.shape[0], H, indices.shape[1], sm_scale * 1.4426950408889634,
        q.stride(0), q.stride(1), indices.stride(0), out.stride(0), out.stride(1), HP=hp, NUM_STAGES=NUM_STAGES,
        num_warps=NUM_WARPS)
    return out, lse
