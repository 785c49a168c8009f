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
def _fp8_gather_dequant_kernel(cache_u8, cache_f32, cache_bf16, idx, rows_out, idx_out, S, n, R: tl.constexpr,
                               WRITE_IDX: tl.constexpr):
    """Rows r in [pid*R, pid*R+R) of a flat index list (FP8 decode: the [B*topk] top-k; FP8 prefill: the
    context's slots). Gathers the 656-B entry of slot idx[r], writes the dequantised row (512 scaled e4m3 + 64
    rope) to rows_out[r, :576] in rows_out's dtype, zeros for invalid slots, and (WRITE_IDX) idx_out[r] = r
    (valid) or -1 (invalid)."""
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
    if WRITE_IDX:
        tl.store(idx_out + r, tl.where(valid, r, -1), mask=rm)


@triton.jit
def _keep_converted(x):
    """Identity the compiler may not move or duplicate (2 x 16-bit per register): the e4m3 -> fp16 conversion before
    it runs once per value in the load layout and the converted tile reaches its MMA through shared memory
    (ldmatrix); without it Triton redoes the conversion inside each MMA operand layout (byte-wise loads)."""
    return tl.inline_asm_elementwise("mov.b32 $0, $1;", "=r,r", [x], dtype=x.dtype, is_pure=False, pack=2)


@triton.jit
def _e4m3(b, KD: tl.constexpr, KEEP: tl.constexpr):
    """e4m3 values (or their uint8 bytes) -> KD, unscaled (exact in fp16: 1 cvt per 2 values on sm_90)."""
    if b.dtype == tl.uint8:
        b = b.to(tl.float8e4nv, bitcast=True)
    k = b.to(KD)
    if KEEP:
        k = _keep_converted(k)
    return k


@triton.jit
def _q_tile_fp16(q_row, hm, off, qs, KD: tl.constexpr):
    d = tl.arange(0, 128)
    x = tl.load(q_row + off + d[None, :], mask=hm[:, None], other=0.0).to(tl.float32)
    return (x * qs[:, None]).to(KD)


@triton.jit(do_not_specialize=["S"])  # S: slots of the whole cache (one compile per cache size)
def _sparse_mla_prefill_fp8_kernel(q, kv_u8, kv_f32, kv_bf16, idx, out, lse, S, H, topk, qk_scale, sq_t, sq_h, si_t,
                                   so_t, so_h, HB: tl.constexpr, BT: tl.constexpr, UPCAST: tl.constexpr):
    """Prefill straight from the 656-B FP8 latent rows. Per step the four e4m3 128-tiles of BT gathered rows are
    converted to fp16 unscaled (exact; one cvt per two values) and each tile's power-of-two scale c_g is applied
    to the small [HB, BT] operands around the MMAs instead of the [BT, 512] tile:
      scores  s = (sum_g c_g * (q16_g . k_g)) / qs + q_pe . k_pe      (q16 = q * qs, qs a power of two per head that
                                                                       puts the head's largest |q| in [2^14, 2^15))
      values  a_g = sum_t (p_t * c_g[t] / r_g) k_g[t]                 (r_g: running max of c_g, a power of two, so
                                                                       p * c / r <= 1 never underflows fp16)
    All scalings are powers of two (exact). The rope part (bf16 k_pe) is a bf16 MMA. Grid (T, head blocks)."""
    t = tl.program_id(0).to(tl.int64)
    h0 = tl.program_id(1) * HB
    KD: tl.constexpr = tl.float32 if UPCAST else tl.float16   # the interpreter: fp32 throughout
    RD: tl.constexpr = tl.float32 if UPCAST else tl.bfloat16
    hh = tl.arange(0, HB)
    hm = h0 + hh < H
    d = tl.arange(0, 128)
    dr = tl.arange(0, _ROPE)
    qrow = q + t * sq_t + (h0 + hh)[:, None] * sq_h
    qmax = tl.zeros([HB], tl.float32)
    for g in tl.static_range(_TILES):
        x = tl.load(qrow + g * 128 + d[None, :], mask=hm[:, None], other=0.0).to(tl.float32)
        qmax = tl.maximum(qmax, tl.max(tl.abs(x), axis=1))
    qe = tl.where(qmax > 0, tl.floor(tl.log2(tl.where(qmax > 0, qmax, 1.0))), 0.0)
    qe = tl.minimum(tl.maximum(qe, -100.0), 100.0)
    qs = tl.exp2(14.0 - qe)
    q0 = _q_tile_fp16(qrow, hm, 0, qs, KD)
    q1 = _q_tile_fp16(qrow, hm, 128, qs, KD)
    q2 = _q_tile_fp16(qrow, hm, 256, qs, KD)
    q3 = _q_tile_fp16(qrow, hm, 384, qs, KD)
    qp = tl.load(qrow + _NOPE + dr[None, :], mask=hm[:, None], other=0.0).to(tl.float32).to(RD)
    nope_scale = (qk_scale * tl.math.div_rn(tl.full([HB], 1.0, tl.float32), qs))[:, None]
    m_i = tl.full([HB], float("-inf"), tl.float32)
    l_i = tl.zeros([HB], tl.float32)
    a0 = tl.zeros([HB, 128], tl.float32)
    a1 = tl.zeros([HB, 128], tl.float32)
    a2 = tl.zeros([HB, 128], tl.float32)
    a3 = tl.zeros([HB, 128], tl.float32)
    r0 = tl.full([], 7.888609052210118e-31, tl.float32)           # 2^-100, below any tile scale
    r1 = r0
    r2 = r0
    r3 = r0
    for s0 in range(0, topk, BT):
        ti = s0 + tl.arange(0, BT)
        ids = tl.load(idx + t * si_t + ti, mask=ti < topk, other=-1)
        valid = (ids >= 0) & (ids < S)
        rows = tl.where(valid, ids, 0).to(tl.int64)
        vm = valid[:, None]
        k8 = kv_u8 + rows[:, None] * _ROW + d[None, :]
        k0 = _e4m3(tl.load(k8, mask=vm, other=0), KD, not UPCAST)
        k1 = _e4m3(tl.load(k8 + 128, mask=vm, other=0), KD, not UPCAST)
        k2 = _e4m3(tl.load(k8 + 256, mask=vm, other=0), KD, not UPCAST)
        k3 = _e4m3(tl.load(k8 + 384, mask=vm, other=0), KD, not UPCAST)
        kp = tl.load(kv_bf16 + rows[:, None] * _ROW_BF16 + _ROPE_BF16 + dr[None, :], mask=vm, other=0.0)
        kp = kp.to(RD)
        scb = kv_f32 + rows * _ROW_F32 + _SCALES_F32
        c0 = tl.load(scb, mask=valid, other=0.0)
        c1 = tl.load(scb + 1, mask=valid, other=0.0)
        c2 = tl.load(scb + 2, mask=valid, other=0.0)
        c3 = tl.load(scb + 3, mask=valid, other=0.0)
        sn = tl.dot(q0, tl.trans(k0)) * c0[None, :]
        sn += tl.dot(q1, tl.trans(k1)) * c1[None, :]
        sn += tl.dot(q2, tl.trans(k2)) * c2[None, :]
        sn += tl.dot(q3, tl.trans(k3)) * c3[None, :]
        s = tl.dot(qp, tl.trans(kp)) * qk_scale + sn * nope_scale
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_use)
        p = tl.exp2(s - m_use[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        n0 = tl.maximum(r0, tl.max(c0, axis=0))
        n1 = tl.maximum(r1, tl.max(c1, axis=0))
        n2 = tl.maximum(r2, tl.max(c2, axis=0))
        n3 = tl.maximum(r3, tl.max(c3, axis=0))
        i0 = tl.math.div_rn(1.0, n0)   # powers of two: exact reciprocals and products
        i1 = tl.math.div_rn(1.0, n1)
        i2 = tl.math.div_rn(1.0, n2)
        i3 = tl.math.div_rn(1.0, n3)
        a0 = tl.dot((p * (c0 * i0)[None, :]).to(KD), k0, a0 * (alpha * (r0 * i0))[:, None])
        a1 = tl.dot((p * (c1 * i1)[None, :]).to(KD), k1, a1 * (alpha * (r1 * i1))[:, None])
        a2 = tl.dot((p * (c2 * i2)[None, :]).to(KD), k2, a2 * (alpha * (r2 * i2))[:, None])
        a3 = tl.dot((p * (c3 * i3)[None, :]).to(KD), k3, a3 * (alpha * (r3 * i3))[:, None])
        r0 = n0
        r1 = n1
        r2 = n2
        r3 = n3
        m_i = m_new
    inv = 1.0 / tl.where(l_i > 0, l_i, 1.0)
    orow = out + t * so_t + (h0 + hh)[:, None] * so_h + d[None, :]
    om = hm[:, None]
    tl.store(orow, (a0 * (inv * r0)[:, None]).to(out.dtype.element_ty), mask=om)
    tl.store(orow + 128, (a1 * (inv * r1)[:, None]).to(out.dtype.element_ty), mask=om)
    tl.store(orow + 256, (a2 * (inv * r2)[:, None]).to(out.dtype.element_ty), mask=om)
    tl.store(orow + 384, (a3 * (inv * r3)[:, None]).to(out.dtype.element_ty), mask=om)
    ls = tl.where(l_i > 0, (m_i + tl.log2(tl.where(l_i > 0, l_i, 1.0))) * 0.6931471805599453, float("-inf"))
    tl.store(lse + t * H + h0 + hh, ls, mask=hm)
