"""Sparse MLA forward in Triton: gather the selected latent rows, QK over 512+64 dims, exp2 online softmax,
PV over the 512-dim value. One program = one query (prefill) or one (batch, topk split) (decode) x a block of
HB heads sharing the same gathered K/V tile; decode splits topk and merges the splits by their lse. An FP8 cache
is first gathered and dequantised once per selected token (``_fp8_gather_dequant_kernel``), then read as bf16 rows.
"""
import triton
import triton.language as tl

from indexcache.kernels import formats as F

_NOPE: tl.constexpr = tl.constexpr(F.NOPE)
_ROPE: tl.constexpr = tl.constexpr(F.ROPE)
_LATENT: tl.constexpr = tl.constexpr(F.LATENT_DIM)
_TILES: tl.constexpr = tl.constexpr(F.LATENT_TILES)
_ROW: tl.constexpr = tl.constexpr(F.LATENT_FP8_BYTES)
_ROW_F32: tl.constexpr = tl.constexpr(F.LATENT_FP8_BYTES // 4)
_ROW_BF16: tl.constexpr = tl.constexpr(F.LATENT_FP8_BYTES // 2)
_SCALES_F32: tl.constexpr = tl.constexpr(F.LATENT_SCALES_AT // 4)
_ROPE_BF16: tl.constexpr = tl.constexpr(F.LATENT_ROPE_AT // 2)


@triton.jit
def _load_kv_tile(kv_ptr, ids, valid, skv, UPCAST: tl.constexpr):
    dn = tl.arange(0, _NOPE)
    dr = tl.arange(0, _ROPE)
    rows = tl.where(valid, ids, 0).to(tl.int64)
    kn = tl.load(kv_ptr + rows[:, None] * skv + dn[None, :], mask=valid[:, None], other=0.0)
    kp = tl.load(kv_ptr + rows[:, None] * skv + _NOPE + dr[None, :], mask=valid[:, None], other=0.0)
    if UPCAST:
        kn = kn.to(tl.float32)
        kp = kp.to(tl.float32)
    return kn, kp


@triton.jit
def _attend(q_ptr, sq_h, H, idx_ptr, n_tok, S, kv_ptr, skv, qk_scale,
            HB: tl.constexpr, BT: tl.constexpr, UPCAST: tl.constexpr):
    """Online softmax over tokens idx_ptr[0:n_tok] for heads [h0, h0+HB) (q_ptr already at head h0)."""
    hh = tl.arange(0, HB)
    hm = hh < H
    dn = tl.arange(0, _NOPE)
    dr = tl.arange(0, _ROPE)
    qn = tl.load(q_ptr + hh[:, None] * sq_h + dn[None, :], mask=hm[:, None], other=0.0)
    qp = tl.load(q_ptr + hh[:, None] * sq_h + _NOPE + dr[None, :], mask=hm[:, None], other=0.0)
    if UPCAST:
        qn = qn.to(tl.float32)
        qp = qp.to(tl.float32)
    m_i = tl.full([HB], float("-inf"), tl.float32)
    l_i = tl.zeros([HB], tl.float32)
    acc = tl.zeros([HB, _NOPE], tl.float32)
    for s0 in range(0, n_tok, BT):
        ti = s0 + tl.arange(0, BT)
        ids = tl.load(idx_ptr + ti, mask=ti < n_tok, other=-1)
        valid = (ids >= 0) & (ids < S)
        kn, kp = _load_kv_tile(kv_ptr, ids, valid, skv, UPCAST)
        s = tl.dot(qn, tl.trans(kn))
        s = tl.dot(qp, tl.trans(kp), s)
        s = tl.where(valid[None, :], s * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_use)
        p = tl.exp2(s - m_use[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(kn.dtype), kn)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit(do_not_specialize=["S"])  # the context grows chunk by chunk: one compile, not one per divisibility
def _sparse_mla_prefill_kernel(q, kv, idx, out, lse, S, H, topk, qk_scale, sq_t, sq_h, skv, si_t, so_t, so_h,
                               HB: tl.constexpr, BT: tl.constexpr, UPCAST: tl.constexpr):
    t = tl.program_id(0)
    h0 = tl.program_id(1) * HB
    acc, m_i, l_i = _attend(q + t.to(tl.int64) * sq_t + h0 * sq_h, sq_h, H - h0, idx + t.to(tl.int64) * si_t,
                            topk, S, kv, skv, qk_scale, HB, BT, UPCAST)
    hh = tl.arange(0, HB)
    hm = h0 + hh < H
    dn = tl.arange(0, _NOPE)
    o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(out + t.to(tl.int64) * so_t + (h0 + hh)[:, None] * so_h + dn[None, :], o.to(out.dtype.element_ty),
             mask=hm[:, None])
    ls = tl.where(l_i > 0, (m_i + tl.log2(tl.where(l_i > 0, l_i, 1.0))) * 0.6931471805599453, float("-inf"))
    tl.store(lse + t.to(tl.int64) * H + h0 + hh, ls, mask=hm)


@triton.jit
def _sparse_mla_decode_kernel(q, cache, idx, out, lse, S, H, topk, chunk, qk_scale, sq_b, sq_h, skv, si_b, NS,
                              HB: tl.constexpr, BT: tl.constexpr, UPCAST: tl.constexpr, DIRECT: tl.constexpr,
                              HEAD_MAJOR: tl.constexpr):
    """DIRECT: write normalised out [B, H, 512] (q dtype) and natural lse [B, H]; else fp32 partials
    out [B, NS, H, 512] (unnormalised acc / l) and log2-domain lse [B, NS, H].
    HEAD_MAJOR: grid is (head blocks, splits, B) instead of (B, splits, head blocks), so the head blocks that
    read the same rows run back to back (L2 reuse); used for the dequantised FP8 rows."""
    if HEAD_MAJOR:
        b = tl.program_id(2)
        h0 = tl.program_id(0) * HB
    else:
        b = tl.program_id(0)
        h0 = tl.program_id(2) * HB
    sp = tl.program_id(1)
    t0 = sp * chunk
    n_tok = tl.minimum(topk - t0, chunk)
    acc, m_i, l_i = _attend(q + b.to(tl.int64) * sq_b + h0 * sq_h, sq_h, H - h0, idx + b.to(tl.int64) * si_b + t0,
                            n_tok, S, cache, skv, qk_scale, HB, BT, UPCAST)
    hh = tl.arange(0, HB)
    hm = h0 + hh < H
    dn = tl.arange(0, _NOPE)
    o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    l2 = tl.where(l_i > 0, m_i + tl.log2(tl.where(l_i > 0, l_i, 1.0)), float("-inf"))
    if DIRECT:
        tl.store(out + (b.to(tl.int64) * H + h0 + hh)[:, None] * _NOPE + dn[None, :], o.to(out.dtype.element_ty),
                 mask=hm[:, None])
        tl.store(lse + b.to(tl.int64) * H + h0 + hh, l2 * 0.6931471805599453, mask=hm)
    else:
        row = (b.to(tl.int64) * NS + sp) * H + h0 + hh
        tl.store(out + row[:, None] * _NOPE + dn[None, :], o, mask=hm[:, None])
        tl.store(lse + row, l2, mask=hm)


@triton.jit
def _combine_kernel(part_o, part_l, out, lse, H, NS, NSP: tl.constexpr):
    b = tl.program_id(0)
    h = tl.program_id(1)
    s = tl.arange(0, NSP)
    dn = tl.arange(0, _NOPE)
    rows = (b.to(tl.int64) * NS + s) * H + h
    l2 = tl.load(part_l + rows, mask=s < NS, other=float("-inf"))
    m = tl.max(l2, axis=0)
    m_use = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp2(l2 - m_use)
    tot = tl.sum(w, axis=0)
    po = tl.load(part_o + rows[:, None] * _NOPE + dn[None, :], mask=(s < NS)[:, None], other=0.0)
    o = tl.sum(po * w[:, None], axis=0) / tl.where(tot > 0, tot, 1.0)
    tl.store(out + (b.to(tl.int64) * H + h) * _NOPE + dn, o.to(out.dtype.element_ty))
    # log2 of a guarded argument: tot = 0 (no valid index in any split) must not reach log2 (the CPU interpreter
    # evaluates both tl.where branches and warns on log2(0))
    tl.store(lse + b * H + h,
             tl.where(tot > 0, (m_use + tl.log2(tl.where(tot > 0, tot, 1.0))) * 0.6931471805599453, float("-inf")))


@triton.jit
def _fp8_gather_dequant_kernel(cache_u8, cache_f32, cache_bf16, idx, rows_out, idx_out, S, n, R: tl.constexpr):
    """FP8 decode: rows r in [pid*R, pid*R+R) of the flattened [B*topk] index list. Gathers the 656-B
    entry of slot idx[r], writes the dequantised row (512 scaled e4m3 + 64 rope) to rows_out[r, :576] in
    rows_out's dtype, zeros for invalid slots, and idx_out[r] = r (valid) or -1 (invalid)."""
    r = tl.program_id(0) * R + tl.arange(0, R)
    rm = r < n
    ids = tl.load(idx + r, mask=rm, other=-1)
    valid = (ids >= 0) & (ids < S)
    rows = tl.where(valid, ids, 0).to(tl.int64)
    g = tl.arange(0, _TILES)
    d = tl.arange(0, 128)
    dr = tl.arange(0, _ROPE)
    vm3 = valid[:, None, None]
    col = g[None, :, None] * 128 + d[None, None, :]
    b = tl.load(cache_u8 + rows[:, None, None] * _ROW + col, mask=vm3, other=0)
    sc = tl.load(cache_f32 + rows[:, None] * _ROW_F32 + _SCALES_F32 + g[None, :], mask=valid[:, None], other=0.0)
    kn = b.to(tl.float8e4nv, bitcast=True).to(tl.float32) * sc[:, :, None]
    kp = tl.load(cache_bf16 + rows[:, None] * _ROW_BF16 + _ROPE_BF16 + dr[None, :], mask=valid[:, None], other=0.0)
    r64 = r.to(tl.int64)
    tl.store(rows_out + r64[:, None, None] * _LATENT + col, kn.to(rows_out.dtype.element_ty), mask=rm[:, None, None])
    tl.store(rows_out + r64[:, None] * _LATENT + _NOPE + dr[None, :], kp.to(tl.float32).to(rows_out.dtype.element_ty),
             mask=rm[:, None])
    tl.store(idx_out + r, tl.where(valid, r, -1), mask=rm)
