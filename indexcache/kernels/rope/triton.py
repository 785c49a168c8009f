"""One launch per rotation: a program per token rotates all its heads, reading x through its strides and writing
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
                 HALF: tl.constexpr, BP: tl.constexpr, BH: tl.constexpr, INTERLEAVED: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    heads = tl.arange(0, BH)
    pairs = tl.arange(0, BP)
    pmask = pairs < HALF
    mask = (heads < H)[:, None] & pmask[None, :]
    DT: tl.constexpr = o_ptr.dtype.element_ty
    c = tl.load(cos_ptr + t * sc_t + pairs, mask=pmask, other=0.0).to(tl.float32)[None, :]
    s = tl.load(sin_ptr + t * ss_t + pairs, mask=pmask, other=0.0).to(tl.float32)[None, :]
    xrow = x_ptr + t * sx_t + heads[:, None] * sx_h
    if INTERLEAVED:
        x1 = tl.load(xrow + 2 * pairs[None, :], mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(xrow + 2 * pairs[None, :] + 1, mask=mask, other=0.0).to(tl.float32)
    else:
        x1 = tl.load(xrow + pairs[None, :], mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(xrow + HALF + pairs[None, :], mask=mask, other=0.0).to(tl.float32)
    o1 = _rnd(x1 * c, DT) - _rnd(x2 * s, DT)
    o2 = _rnd(x2 * c, DT) + _rnd(x1 * s, DT)
    orow = o_ptr + t * so_t + heads[:, None] * so_h + pairs[None, :]
    tl.store(orow, o1.to(DT), mask=mask)
    tl.store(orow + HALF, o2.to(DT), mask=mask)


def rope_triton(x, cos, sin, interleaved, out):
    T, H, R = x.shape
    if T == 0 or H == 0:
        return
    kw = {} if interpreting() else {"enable_fp_fusion": False}
    _rope_kernel[(T,)](x, cos, sin, out, T, H, x.stride(0), x.stride(1), out.stride(0), out.stride(1),
                       cos.stride(0), sin.stride(0), HALF=R // 2, BP=triton.next_power_of_2(R // 2), BH=triton.next_power_of_2(H),
                       INTERLEAVED=interleaved, num_warps=4 if H * R <= 4096 else 8, **kw)
