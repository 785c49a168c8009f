"""Gluon sparse MLA prefill from the bf16 (or fp16) latent cache for Hopper (sm_90a): ``sparse_mla_prefill(...,
backend="gluon")`` with kv_format "bf16", the contract of the Triton bf16 kernel with the row gathers pipelined.

Why: the Triton kernel gathers a tile of rows and then waits for it in full before its MMAs, so a program spends
the gather's latency on every tile. Here, as in the FP8 kernel (``gluon.py``), one program (one warpgroup) owns
one query and HP = 16 or 32 heads (20 heads: 32, zero-padded) and walks its top-k list in tiles of BT = 64 rows:
- ring: the 1152-B rows of tile i (512 nope + 64 rope values) are gathered with cp.async on pointers built from
  idx (one commit group a tile; invalid rows: masked copies, zero-filled) straight into NVMMA-layout stage
  i % 2, which the wgmma reads as its operands: no dequantisation, so the shared-memory traffic of a tile is its
  gather plus the MMA reads;
- token-major wgmma (heads are the small N dimension): S^T [BT, HP] = K [BT, 512] . Q^T plus the rope part
  KPE [BT, 64] . QPE^T into its own accumulator; an exp2 online softmax per head (column) in fp32;
- PV: O^T [512, HP] += K^T [512, BT] . P^T [BT, HP]: the same stage read transposed (A M-major), P^T (the
  cache's dtype, <= 2^8) through a small shared buffer.

Sizes (HP 32): a stage is 73728 B (64 x 1152), q 36864, P^T 4096; 3 stages would need 262144 B of the 232448 an SM
has, and a smaller tile does not exist for this orientation (one warpgroup's wgmma has M = 64 tokens), so the ring
has NUM_STAGES = 2 (188416 B, 188928 with the reductions' scratch; HP 16: 168192). A stage is busy from its gather
until the PV that reads it is done, so each tile refills the stage of the tile before right after that PV and
before waiting for its own rows: while a tile's rows are awaited the next tile's are in flight too (two tiles), and
the next one loads during the MMAs and the softmax. With load time L and compute C per tile, a tile then takes
about max(C, (L + C) / 2) (one tile in flight: max(C, L)). PV(i-1) runs while the loop comes round and ends at the
top of tile i, where its wait frees the stage; tile i's rows keep arriving meanwhile.

Softmax: m (per head) moves only when some head's max grew by more than 2^8 (then O^T and the row sums are
rescaled, else alpha = 1 and the 128 multiplies of O^T a tile are skipped): p <= 2^8 against the old m cannot
overflow fp32 or the cache's dtype, and m only has to be the one shift of both O^T and l. The row sums stay per
token ([BT, HP] in the accumulator layout) until after the loop: a sum over the tile's tokens, which lie in all
four warps, would cost a shared-memory round with 3 CTA barriers a tile. Rows with no valid index give out 0 and
lse -inf (the Triton rule).

Limits (checked by the launcher, ``ops._prefill_bf16_gluon``): CUDA tensors on sm_90, a 16-byte aligned cache of
bf16 or fp16 rows (the MMA operand dtype; q, of the same dtype, is converted to it in the kernel all the same),
more than 32 heads run as head blocks of 32 that each gather the rows again. Compiles without a GPU
(``python -m tests.kernels.sm90_compile --sparse-mla-gluon-bf16``).
"""
from __future__ import annotations

import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy as cp
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, warpgroup_mma,
                                                               warpgroup_mma_wait)

from indexcache.kernels import formats as F
from indexcache.kernels.sparse_mla.gluon import (BT, NUM_WARPS, _cta_barrier, _load_ids, _mma_layout, _store_out,
                                                 heads_per_program)

__all__ = ["BT", "NUM_STAGES", "NUM_WARPS", "heads_per_program", "sparse_mla_prefill_bf16_gluon"]

# tiles in the ring (72 KB each at BT 64): two + q + P^T fit the 227 KB of an SM, three do not (module docstring)
NUM_STAGES = 2
_ROW: gl.constexpr = gl.constexpr(F.LATENT_DIM)      # 576 values a cache row
_NOPE: gl.constexpr = gl.constexpr(F.NOPE)           # 512: the value part, then the 64 rope values


@gluon.constexpr_function
def _row_layout():
    """[BT, n] rows of 16-bit values, 16 B (8 values) a thread: a warp covers 4 rows x 128 B (whole L2 lines)."""
    return gl.BlockedLayout([1, 8], [4, 8], [4, 1], [1, 0])


@gluon.jit
def _issue(kv, nope_ring, kpe_ring, s, ids_g, ok_g):
    """cp.async of one tile's rows (ids_g / ok_g in SliceLayout(1, _row_layout())) into stage s; masked (invalid)
    rows are zero-filled, so the MMAs see zeros (finite) there."""
    GL: gl.constexpr = _row_layout()
    rows = gl.expand_dims(gl.where(ok_g, ids_g, 0).to(gl.int64) * _ROW, 1)
    msk = gl.expand_dims(ok_g, 1)
    c = gl.arange(0, 512, layout=gl.SliceLayout(0, GL))
    cp.async_copy_global_to_shared(nope_ring.index(s), kv + rows + gl.expand_dims(c, 0), mask=msk)
    cr = gl.arange(0, 64, layout=gl.SliceLayout(0, GL))
    cp.async_copy_global_to_shared(kpe_ring.index(s), kv + rows + _NOPE + gl.expand_dims(cr, 0), mask=msk)


@gluon.jit
def _prepare_q(q_row, sq_h, hb, q_smem, qpe_smem, HP: gl.constexpr):
    """q of the program's heads (rows past hb zero) in the cache's dtype -> q_smem [HP, 512] and qpe_smem [HP, 64]
    (q of another float dtype is converted here: it is read once a program)."""
    QL: gl.constexpr = _row_layout()
    dt: gl.constexpr = q_smem.dtype
    hh = gl.arange(0, HP, layout=gl.SliceLayout(1, QL))
    hm = gl.expand_dims(hh < hb, 1)
    ptr = q_row + gl.expand_dims(hh * sq_h, 1) + gl.expand_dims(gl.arange(0, 128, layout=gl.SliceLayout(0, QL)), 0)
    for g in gl.static_range(4):
        q_smem.slice(g * 128, 128, dim=1).store(gl.load(ptr + g * 128, mask=hm, other=0.0).to(dt))
    dr = gl.arange(0, 64, layout=gl.SliceLayout(0, QL))
    xr = gl.load(q_row + gl.expand_dims(hh * sq_h + 512, 1) + gl.expand_dims(dr, 0), mask=hm, other=0.0)
    qpe_smem.store(xr.to(dt))


@gluon.jit
def _softmax_step(acc, accr, ok, qk_scale, m_i, dt: gl.constexpr):
    """One tile's exp2 online softmax per head (column) of S^T = acc + accr. Returns p (fp32, <= 2^8), P^T (p in
    dtype dt), the factor of the running O^T and row sums (alpha, per head), whether they need it (``rescale``;
    else alpha is 1 for every head) and the new m. m moves only when some head's max grew by more than 2^8
    (log2 units: 8)."""
    sc = gl.where(gl.expand_dims(ok, 1), (acc + accr) * qk_scale, float("-inf"))
    m_cand = gl.maximum(m_i, gl.max(sc, axis=0))
    # -inf - -inf (no valid row yet) is NaN: compares false, nothing to rescale
    grown = gl.max(gl.where(m_cand - m_i > 8.0, 1, 0), axis=0)
    rescale = grown > 0
    m_new = gl.where(rescale, m_cand, m_i)
    m_use = gl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = gl.exp2(m_i - m_use)
    p = gl.exp2(sc - gl.expand_dims(m_use, 0))
    return p, p.to(dt), alpha, rescale, m_new


@gluon.jit(do_not_specialize=["S", "topk"])
def _sparse_mla_prefill_bf16_gluon_kernel(q, kv, idx, out, lse, S, H, topk, qk_scale, sq_t, sq_h, si_t, so_t,
                                          so_h, HP: gl.constexpr, NUM_STAGES: gl.constexpr,
                                          num_warps: gl.constexpr):
    """One program: query t, heads h0 .. h0 + HP - 1. Tile i (stage s = i % 2) in order: wait PV(i-1) (it read the
    other stage and P^T), refill that stage with tile i + 1, wait for tile i's rows (tile i + 1 stays in flight),
    QK and rope MMAs, softmax, P^T, and PV(i) left running round the loop."""
    gl.static_assert(NUM_STAGES == 2, "the refill order below assumes a ring of two stages")
    t = gl.program_id(0).to(gl.int64)
    h0 = gl.program_id(1) * HP
    hb = H - h0
    dt: gl.constexpr = kv.dtype.element_ty
    MMA: gl.constexpr = _mma_layout(HP)
    ROWL: gl.constexpr = gl.SliceLayout(1, MMA)      # per token of S^T
    COLL: gl.constexpr = gl.SliceLayout(0, MMA)      # per head
    IDL: gl.constexpr = gl.SliceLayout(1, _row_layout())

    nope_ring = gl.allocate_shared_memory(dt, [NUM_STAGES, 64, 512],
                                          gl.NVMMASharedLayout.get_default_for([64, 512], dt))
    kpe_ring = gl.allocate_shared_memory(dt, [NUM_STAGES, 64, 64], gl.NVMMASharedLayout.get_default_for([64, 64], dt))
    # single buffers with a leading dim of 1, indexed in the loop by a value the compiler cannot prove is 0 (as in
    # gluon.py): their wgmma descriptors are rebuilt each tile instead of being hoisted into registers
    q_all = gl.allocate_shared_memory(dt, [1, HP, 512], gl.NVMMASharedLayout.get_default_for([HP, 512], dt))
    qpe_all = gl.allocate_shared_memory(dt, [1, HP, 64], gl.NVMMASharedLayout.get_default_for([HP, 64], dt))
    p_all = gl.allocate_shared_memory(dt, [1, 64, HP], gl.NVMMASharedLayout.get_default_for([64, HP], dt))

    idx_row = idx + t * si_t
    n_tiles = gl.cdiv(topk, 64)
    ids_g, ok_g = _load_ids(idx_row, 0, topk, S, IDL)
    _issue(kv, nope_ring, kpe_ring, 0, ids_g, ok_g)
    cp.commit_group()
    ids_g, ok_g = _load_ids(idx_row, 1, topk, S, IDL)
    _prepare_q(q + t * sq_t + h0 * sq_h, sq_h, hb, q_all.index(0), qpe_all.index(0), HP)

    m_i = gl.full([HP], float("-inf"), gl.float32, COLL)
    l_acc = gl.zeros([64, HP], gl.float32, MMA)                  # row sums per token (module docstring)
    # O^T is carried round the loop as the PV wgmma in flight; ptxas serialises every wgmma unless that value
    # comes from a wgmma on entry too (gluon.py): a PV of zeros over stage 1 (zeroed: finite, 0 x NaN would not
    # be 0), which tile 0's first step waits for before refilling that stage with tile 1
    ZL: gl.constexpr = _row_layout()
    nope_ring.index(1).store(gl.zeros([64, 512], dt, ZL))
    p_all.index(0).store(gl.zeros([64, HP], dt, ZL))
    fence_async_shared()                                            # also q / qpe before the first wgmma
    _cta_barrier()
    o = warpgroup_mma(nope_ring.index(1).permute((1, 0)), p_all.index(0), gl.zeros([512, HP], gl.float32, MMA),
                      use_acc=False, is_async=True)
    for i in range(n_tiles):
        s = i % NUM_STAGES
        z = i >> 30                                                # 0 (i < 2^30): see q_all
        p_smem = p_all.index(z)
        _, ok = _load_ids(idx_row, i, topk, S, ROWL)              # used at the softmax: latency hidden
        o = warpgroup_mma_wait(num_outstanding=0, deps=(o, ))
        _cta_barrier()                                             # every warp past PV(i-1): its stage is free
        _issue(kv, nope_ring, kpe_ring, 1 - s, ids_g, ok_g)        # tile i + 1 (past topk: all masked)
        cp.commit_group()
        ids_g, ok_g = _load_ids(idx_row, i + 2, topk, S, IDL)
        cp.wait_group(1)                                           # tile i landed (this thread's copies)
        fence_async_shared()                                       # cp.async wrote through the generic proxy
        _cta_barrier()                                             # everyone's
        # both accumulators' registers are defined before the first MMA starts (gluon.py: else serialised)
        zero_s = gl.zeros([64, HP], gl.float32, MMA)
        accr = warpgroup_mma(kpe_ring.index(s), qpe_all.index(z).permute((1, 0)), zero_s, use_acc=False,
                             is_async=True)
        acc = warpgroup_mma(nope_ring.index(s), q_all.index(z).permute((1, 0)), zero_s, use_acc=False,
                            is_async=True)
        accr, acc = warpgroup_mma_wait(num_outstanding=0, deps=(accr, acc))
        p, pt, alpha, rescale, m_i = _softmax_step(acc, accr, ok, qk_scale, m_i, dt)
        p_smem.store(pt)
        fence_async_shared()
        _cta_barrier()
        if rescale:
            o = o * gl.expand_dims(alpha, 0)
            l_acc = l_acc * gl.expand_dims(alpha, 0)
        l_acc = l_acc + p
        o = warpgroup_mma(nope_ring.index(s).permute((1, 0)), p_smem, o, is_async=True)
    o = warpgroup_mma_wait(num_outstanding=0, deps=(o, ))
    cp.wait_group(0)
    _cta_barrier()                                                 # the ring is free for the output staging

    hh = gl.arange(0, HP, layout=COLL)
    l_i = gl.sum(l_acc, axis=0)
    inv = gl.where(l_i > 0, 1.0 / gl.where(l_i > 0, l_i, 1.0), 0.0)
    _store_out(o, inv, nope_ring.index(0), out + t * so_t + h0 * so_h, so_h, hb, HP)
    ls = gl.where(l_i > 0, (m_i + gl.log2(gl.where(l_i > 0, l_i, 1.0))) * 0.6931471805599453, float("-inf"))
    gl.store(lse + t * H + h0 + hh, ls, mask=hh < hb)


def sparse_mla_prefill_bf16_gluon(q, kv, indices, out, lse, sm_scale: float):
    """Launch on checked inputs (``ops._prefill_bf16_gluon``): q [T, H, 576] (last dim contiguous), kv [S, 576]
    bf16 / fp16 contiguous, indices [T, topk] int32 contiguous, out [T, H, 512] and lse [T, H] to fill."""
    T, H, _ = q.shape
    hp = heads_per_program(H)
    _sparse_mla_prefill_bf16_gluon_kernel[(T, triton.cdiv(H, hp))](
        q, kv, indices, out, lse, kv.shape[0], H, indices.shape[1], sm_scale * 1.4426950408889634, q.stride(0),
        q.stride(1), indices.stride(0), out.stride(0), out.stride(1), HP=hp, NUM_STAGES=NUM_STAGES,
        num_warps=NUM_WARPS)
    return out, lse
