"""Sparse MLA forward in Triton: gather the selected latent rows, QK over 512+64 dims, exp2 online softmax,
PV over the 512-dim value. One program = one query (prefill) or one (batch, topk split) (decode) x a block of
HB heads sharing the same gathered K/V tile; decode splits topk and merges the splits by their lse.
"""
import triton
import triton.language as tl


@triton.jit
def _load_kv_tile(kv_u8, kv_f32, kv_bf16, kv_ptr, ids, valid, skv, FP8: tl.constexpr, UPCAST: tl.constexpr):
    dn = tl.arange(0, 512)
    dr = tl.arange(0, 64)
    rows = tl.where(valid, ids, 0).to(tl.int64)
    if FP8:
        b = tl.load(kv_u8 + rows[:, None] * 656 + dn[None, :], mask=valid[:, None], other=0)
        sc = tl.load(kv_f32 + rows[:, None] * 164 + 128 + dn[None, :] // 128, mask=valid[:, None], other=0.0)
        kn = b.to(tl.float8e4nv, bitcast=True).to(tl.float32) * sc
        kp = tl.load(kv_bf16 + rows[:, None] * 328 + 264 + dr[None, :], mask=valid[:, None], other=0.0)
        if UPCAST:
            kp = kp.to(tl.float32)
        else:
            kn = kn.to(tl.bfloat16)
    else:
        kn = tl.load(kv_ptr + rows[:, None] * skv + dn[None, :], mask=valid[:, None], other=0.0)
        kp = tl.load(kv_ptr + rows[:, None] * skv + 512 + dr[None, :], mask=valid[:, None], other=0.0)
        if UPCAST:
            kn = kn.to(tl.float32)
            kp = kp.to(tl.float32)
    return kn, kp


@triton.jit
def _attend(q_ptr, sq_h, H, idx_ptr, n_tok, S, kv_u8, kv_f32, kv_bf16, kv_ptr, skv, qk_scale,
            HB: tl.constexpr, BT: tl.constexpr, FP8: tl.constexpr, UPCAST: tl.constexpr):
    """Online softmax over tokens idx_ptr[0:n_tok] for heads [h0, h0+HB) (q_ptr already at head h0)."""
    hh = tl.arange(0, HB)
    hm = hh < H
    dn = tl.arange(0, 512)
    dr = tl.arange(0, 64)
    qn = tl.load(q_ptr + hh[:, None] * sq_h + dn[None, :], mask=hm[:, None], other=0.0)
    qp = tl.load(q_ptr + hh[:, None] * sq_h + 512 + dr[None, :], mask=hm[:, None], other=0.0)
    if UPCAST:
        qn = qn.to(tl.float32)
        qp = qp.to(tl.float32)
    elif FP8:
        qn = qn.to(tl.bfloat16)
        qp = qp.to(tl.bfloat16)
    m_i = tl.full([HB], float("-inf"), tl.float32)
    l_i = tl.zeros([HB], tl.float32)
    acc = tl.zeros([HB, 512], tl.float32)
    for s0 in range(0, n_tok, BT):
        ti = s0 + tl.arange(0, BT)
        ids = tl.load(idx_ptr + ti, mask=ti < n_tok, other=-1)
        valid = (ids >= 0) & (ids < S)
        kn, kp = _load_kv_tile(kv_u8, kv_f32, kv_bf16, kv_ptr, ids, valid, skv, FP8, UPCAST)
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


@triton.jit
def _sparse_mla_prefill_kernel(q, kv, idx, out, lse, S, H, topk, qk_scale, sq_t, sq_h, skv, si_t, so_t, so_h,
                               HB: tl.constexpr, BT: tl.constexpr, UPCAST: tl.constexpr):
    t = tl.program_id(0)
    h0 = tl.program_id(1) * HB
    acc, m_i, l_i = _attend(q + t.to(tl.int64) * sq_t + h0 * sq_h, sq_h, H - h0, idx + t.to(tl.int64) * si_t,
                            topk, S, kv, kv, kv, kv, skv, qk_scale, HB, BT, False, UPCAST)
    hh = tl.arange(0, HB)
    hm = h0 + hh < H
    dn = tl.arange(0, 512)
    o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(out + t.to(tl.int64) * so_t + (h0 + hh)[:, None] * so_h + dn[None, :], o.to(out.dtype.element_ty),
             mask=hm[:, None])
    ls = tl.where(l_i > 0, (m_i + tl.log2(tl.where(l_i > 0, l_i, 1.0))) * 0.6931471805599453, float("-inf"))
    tl.store(lse + t.to(tl.int64) * H + h0 + hh, ls, mask=hm)


@triton.jit
def _sparse_mla_decode_kernel(q, cache_u8, cache_f32, cache_bf16, cache, idx, out, lse, S, H, topk, chunk,
                              qk_scale, sq_b, sq_h, skv, si_b, NS,
                              HB: tl.constexpr, BT: tl.constexpr, FP8: tl.constexpr, UPCAST: tl.constexpr,
                              DIRECT: tl.constexpr, HEAD_MAJOR: tl.constexpr):
    """DIRECT: write normalised out [B, H, 512] (q dtype) and natural lse [B, H]; else fp32 partials
    out [B, NS, H, 512] (unnormalised acc / l) and log2-domain lse [B, NS, H].
    HEAD_MAJOR: grid is (head blocks, splits, B) instead of (B, splits, head blocks), so the head blocks that
    read the same rows run back to back (L2 reuse); used by the fp8 "dequant" strategy."""
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
                            n_tok, S, cache_u8, cache_f32, cache_bf16, cache, skv, qk_scale, HB, BT, FP8, UPCAST)
    hh = tl.arange(0, HB)
    hm = h0 + hh < H
    dn = tl.arange(0, 512)
    o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    l2 = tl.where(l_i > 0, m_i + tl.log2(tl.where(l_i > 0, l_i, 1.0)), float("-inf"))
    if DIRECT:
        tl.store(out + (b.to(tl.int64) * H + h0 + hh)[:, None] * 512 + dn[None, :], o.to(out.dtype.element_ty),
                 mask=hm[:, None])
        tl.store(lse + b.to(tl.int64) * H + h0 + hh, l2 * 0.6931471805599453, mask=hm)
    else:
        row = (b.to(tl.int64) * NS + sp) * H + h0 + hh
        tl.store(out + row[:, None] * 512 + dn[None, :], o, mask=hm[:, None])
        tl.store(lse + row, l2, mask=hm)


@triton.jit
def _combine_kernel(part_o, part_l, out, lse, H, NS, NSP: tl.constexpr):
    b = tl.program_id(0)
    h = tl.program_id(1)
    s = tl.arange(0, NSP)
    dn = tl.arange(0, 512)
    rows = (b.to(tl.int64) * NS + s) * H + h
    l2 = tl.load(part_l + rows, mask=s < NS, other=float("-inf"))
    m = tl.max(l2, axis=0)
    m_use = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp2(l2 - m_use)
    tot = tl.sum(w, axis=0)
    po = tl.load(part_o + rows[:, None] * 512 + dn[None, :], mask=(s < NS)[:, None], other=0.0)
    o = tl.sum(po * w[:, None], axis=0) / tl.where(tot > 0, tot, 1.0)
    tl.store(out + (b.to(tl.int64) * H + h) * 512 + dn, o.to(out.dtype.element_ty))
    tl.store(lse + b * H + h, tl.where(tot > 0, (m_use + tl.log2(tot)) * 0.6931471805599453, float("-inf")))


# ---------------------------------------------------------------------------------------------------------------
# Selectable variants (benchmarked side by side with the defaults above; see docs/kernels_attention.md).
# ---------------------------------------------------------------------------------------------------------------
@triton.jit
def _sparse_mla_prefill_split_kernel(q, kv, idx, out, lse, S, H, topk, qk_scale, sq_t, sq_h, skv, si_t, so_t, so_h,
                                     HB: tl.constexpr, BT: tl.constexpr, UPCAST: tl.constexpr,
                                     TWO_PROGRAMS: tl.constexpr):
    """D_v split in two 256-column halves.
    TWO_PROGRAMS ("split_dv"): grid (T, head blocks, 2); program_id(2) owns V half `mine` and recomputes the full
    QK (its half + the other half + rope) -> [HB, 256] fp32 accumulator per program.
    Else ("split_acc", FlagGems-style): one program, K loaded as two halves, two [HB, 256] accumulators."""
    t = tl.program_id(0)
    h0 = tl.program_id(1) * HB
    if TWO_PROGRAMS:
        mine = tl.program_id(2) * 256
    else:
        mine = 0
    other = 256 - mine
    hh = tl.arange(0, HB)
    hm = h0 + hh < H
    d2 = tl.arange(0, 256)
    dr = tl.arange(0, 64)
    qrow = q + t.to(tl.int64) * sq_t + (h0 + hh)[:, None] * sq_h
    qa = tl.load(qrow + mine + d2[None, :], mask=hm[:, None], other=0.0)
    qo = tl.load(qrow + other + d2[None, :], mask=hm[:, None], other=0.0)
    qp = tl.load(qrow + 512 + dr[None, :], mask=hm[:, None], other=0.0)
    if UPCAST:
        qa = qa.to(tl.float32)
        qo = qo.to(tl.float32)
        qp = qp.to(tl.float32)
    m_i = tl.full([HB], float("-inf"), tl.float32)
    l_i = tl.zeros([HB], tl.float32)
    acc_a = tl.zeros([HB, 256], tl.float32)
    acc_o = tl.zeros([HB, 256], tl.float32)
    irow = idx + t.to(tl.int64) * si_t
    for s0 in range(0, topk, BT):
        ti = s0 + tl.arange(0, BT)
        ids = tl.load(irow + ti, mask=ti < topk, other=-1)
        valid = (ids >= 0) & (ids < S)
        krow = kv + tl.where(valid, ids, 0).to(tl.int64)[:, None] * skv
        ka = tl.load(krow + mine + d2[None, :], mask=valid[:, None], other=0.0)
        ko = tl.load(krow + other + d2[None, :], mask=valid[:, None], other=0.0)
        kp = tl.load(krow + 512 + dr[None, :], mask=valid[:, None], other=0.0)
        if UPCAST:
            ka = ka.to(tl.float32)
            ko = ko.to(tl.float32)
            kp = kp.to(tl.float32)
        s = tl.dot(qa, tl.trans(ka))
        s = tl.dot(qo, tl.trans(ko), s)
        s = tl.dot(qp, tl.trans(kp), s)
        s = tl.where(valid[None, :], s * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_use)
        p = tl.exp2(s - m_use[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        pc = p.to(ka.dtype)
        acc_a = acc_a * alpha[:, None] + tl.dot(pc, ka)
        if not TWO_PROGRAMS:
            acc_o = acc_o * alpha[:, None] + tl.dot(pc, ko)
        m_i = m_new
    inv = 1.0 / tl.where(l_i > 0, l_i, 1.0)
    orow = out + t.to(tl.int64) * so_t + (h0 + hh)[:, None] * so_h
    tl.store(orow + mine + d2[None, :], (acc_a * inv[:, None]).to(out.dtype.element_ty), mask=hm[:, None])
    if not TWO_PROGRAMS:
        tl.store(orow + other + d2[None, :], (acc_o * inv[:, None]).to(out.dtype.element_ty), mask=hm[:, None])
    ls = tl.where(l_i > 0, (m_i + tl.log2(tl.where(l_i > 0, l_i, 1.0))) * 0.6931471805599453, float("-inf"))
    if TWO_PROGRAMS:
        tl.store(lse + t.to(tl.int64) * H + h0 + hh, ls, mask=hm & (tl.program_id(2) == 0))
    else:
        tl.store(lse + t.to(tl.int64) * H + h0 + hh, ls, mask=hm)


@triton.jit
def _sparse_mla_prefill_swapab_kernel(q, kv, idx, out, lse, S, H, topk, qk_scale, sq_t, sq_h, skv, si_t, so_t,
                                      so_h, HB: tl.constexpr, BT: tl.constexpr, UPCAST: tl.constexpr):
    """Few heads ("swap_ab"): tokens on the MMA M dimension, heads on N. S^T [BT, HB] = K . Q^T,
    O^T [512, HB] += V^T . P^T, softmax statistics along axis 0. M = BT (64) is full even for 16/20 heads."""
    t = tl.program_id(0)
    h0 = tl.program_id(1) * HB
    hh = tl.arange(0, HB)
    hm = h0 + hh < H
    dn = tl.arange(0, 512)
    dr = tl.arange(0, 64)
    qrow = q + t.to(tl.int64) * sq_t + (h0 + hh)[:, None] * sq_h
    qn = tl.load(qrow + dn[None, :], mask=hm[:, None], other=0.0)
    qp = tl.load(qrow + 512 + dr[None, :], mask=hm[:, None], other=0.0)
    if UPCAST:
        qn = qn.to(tl.float32)
        qp = qp.to(tl.float32)
    m_i = tl.full([HB], float("-inf"), tl.float32)
    l_i = tl.zeros([HB], tl.float32)
    acc = tl.zeros([512, HB], tl.float32)
    irow = idx + t.to(tl.int64) * si_t
    for s0 in range(0, topk, BT):
        ti = s0 + tl.arange(0, BT)
        ids = tl.load(irow + ti, mask=ti < topk, other=-1)
        valid = (ids >= 0) & (ids < S)
        krow = kv + tl.where(valid, ids, 0).to(tl.int64)[:, None] * skv
        kn = tl.load(krow + dn[None, :], mask=valid[:, None], other=0.0)
        kp = tl.load(krow + 512 + dr[None, :], mask=valid[:, None], other=0.0)
        if UPCAST:
            kn = kn.to(tl.float32)
            kp = kp.to(tl.float32)
        s = tl.dot(kn, tl.trans(qn))
        s = tl.dot(kp, tl.trans(qp), s)
        s = tl.where(valid[:, None], s * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=0))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_use)
        p = tl.exp2(s - m_use[None, :])
        l_i = l_i * alpha + tl.sum(p, axis=0)
        acc = acc * alpha[None, :] + tl.dot(tl.trans(kn), p.to(kn.dtype))
        m_i = m_new
    o = acc / tl.where(l_i > 0, l_i, 1.0)[None, :]
    tl.store(out + t.to(tl.int64) * so_t + (h0 + hh)[None, :] * so_h + dn[:, None], o.to(out.dtype.element_ty),
             mask=hm[None, :])
    ls = tl.where(l_i > 0, (m_i + tl.log2(tl.where(l_i > 0, l_i, 1.0))) * 0.6931471805599453, float("-inf"))
    tl.store(lse + t.to(tl.int64) * H + h0 + hh, ls, mask=hm)


@triton.jit
def _fp8_gather_dequant_kernel(cache_u8, cache_f32, cache_bf16, idx, rows_out, idx_out, S, n, R: tl.constexpr):
    """fp8_strategy="dequant": rows r in [pid*R, pid*R+R) of the flattened [B*topk] index list. Gathers the 656-B
    entry of slot idx[r], writes the dequantised row (512 scaled e4m3 + 64 rope) to rows_out[r, :576] in
    rows_out's dtype, zeros for invalid slots, and idx_out[r] = r (valid) or -1 (invalid)."""
    r = tl.program_id(0) * R + tl.arange(0, R)
    rm = r < n
    ids = tl.load(idx + r, mask=rm, other=-1)
    valid = (ids >= 0) & (ids < S)
    rows = tl.where(valid, ids, 0).to(tl.int64)
    g = tl.arange(0, 4)
    d = tl.arange(0, 128)
    dr = tl.arange(0, 64)
    vm3 = valid[:, None, None]
    col = g[None, :, None] * 128 + d[None, None, :]
    b = tl.load(cache_u8 + rows[:, None, None] * 656 + col, mask=vm3, other=0)
    sc = tl.load(cache_f32 + rows[:, None] * 164 + 128 + g[None, :], mask=valid[:, None], other=0.0)
    kn = b.to(tl.float8e4nv, bitcast=True).to(tl.float32) * sc[:, :, None]
    kp = tl.load(cache_bf16 + rows[:, None] * 328 + 264 + dr[None, :], mask=valid[:, None], other=0.0)
    r64 = r.to(tl.int64)
    tl.store(rows_out + r64[:, None, None] * 576 + col, kn.to(rows_out.dtype.element_ty), mask=rm[:, None, None])
    tl.store(rows_out + r64[:, None] * 576 + 512 + dr[None, :], kp.to(tl.float32).to(rows_out.dtype.element_ty),
             mask=rm[:, None])
    tl.store(idx_out + r, tl.where(valid, r, -1), mask=rm)
