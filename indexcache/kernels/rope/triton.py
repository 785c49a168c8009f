"""One launch per rotation: a program rotates all heads of a few tokens, reading x through its strides and writing
the result through the output's (a slice of a wider buffer, or x itself: every element is read before any is
written, and programs own disjoint rows). Each product and sum is rounded to the output dtype, as the reference's
separate ops round them; fp fusion is off so fp32 products are not contracted into FMAs either."""
from __future__ import annotations

import triton
import triton.language as tl

from indexcache.kernels._dispatch import interpreting


@triton.jit
def _rnd(v, DT: tl.constexpr):
    return v.to(DT).to(tl.float32)


@triton.jit(do_not_specialize=["T"])  # tokens per step vary (chunks, decode batches)
def _rope_kernel(x_ptr, cos_ptr, sin_ptr, o_ptr, T, H, sx_t, sx_h, so_t, so_h, sc_t, ss_t,
                 HALF: tl.constexpr, BT: tl.constexpr, BH: tl.constexpr, BP: tl.constexpr,
                 INTERLEAVED: tl.constexpr):
    toks = (tl.program_id(0) * BT + tl.arange(0, BT)).to(tl.int64)[:, None, None]  # [BT, 1, 1]
    heads = tl.arange(0, BH)[None, :, None]                                         # [1, BH, 1]
    pairs = tl.arange(0, BP)[None, None, :]                                         # [1, 1, BP]
    tp = (toks < T) & (pairs < HALF)
    mask = tp & (heads < H)
    DT: tl.constexpr = o_ptr.dtype.element_ty
    c = tl.load(cos_ptr + toks * sc_t + pairs, mask=tp, other=0.0).to(tl.float32)
    s = tl.load(sin_ptr + toks * ss_t + pairs, mask=tp, other=0.0).to(tl.float32)
    xrow = x_ptr + toks * sx_t + heads * sx_h
    if INTERLEAVED:
        x1 = tl.load(xrow + 2 * pairs, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(xrow + 2 * pairs + 1, mask=mask, other=0.0).to(tl.float32)
    else:
        x1 = tl.load(xrow + pairs, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(xrow + HALF + pairs, mask=mask, other=0.0).to(tl.float32)
    o1 = _rnd(x1 * c, DT) - _rnd(x2 * s, DT)
    o2 = _rnd(x2 * c, DT) + _rnd(x1 * s, DT)
    orow = o_ptr + toks * so_t + heads * so_h + pairs
    tl.store(orow, o1.to(DT), mask=mask)
    tl.store(orow + HALF, o2.to(DT), mask=mask)


def rope_triton(x, cos, sin, interleaved, out):
    T, H, R = x.shape
    if T == 0 or H == 0:
        return
    bh, bp = triton.next_power_of_2(H), triton.next_power_of_2(R // 2)
    bt = max(1, min(16, 1024 // (bh * bp)))  # about 1K rotated pairs per program
    kw = {} if interpreting() else {"enable_fp_fusion": False}
    _rope_kernel[(triton.cdiv(T, bt),)](x, cos, sin, out, T, H, x.stride(0), x.stride(1), out.stride(0),
                                        out.stride(1), cos.stride(0), sin.stride(0), HALF=R // 2, BT=bt, BH=bh,
                                        BP=bp, INTERLEAVED=interleaved, num_warps=4, **kw)
