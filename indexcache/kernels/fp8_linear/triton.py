"""Triton per-token 1x128 activation quantisation, written straight into the layout scaled_mm reads.

One pass over x [M, K]: each program loads a [BLOCK_R, 128] tile (BLOCK_R rows, one 128-channel group), takes
each row's amax, and writes the e4m3 values q [Mp, K] and the fp32 scales into scale [Mp, ceil(K/128)] with
strides (1, Mp) (column-major: scaled_mm's scale_a layout, and coalesced here, as a tile's rows are adjacent in
it). Rows M..Mp-1 (padding to a multiple of 4 for scaled_mm) are written as zeros with the all-zero scale, so no
F.pad, transpose or copy runs around it. A ragged K (a partial last group) is masked.
The values equal ``quantize_act_reference``'s bit for bit: scale = max(amax, 1e-12) / 448 and q = x / scale
both use round-to-nearest division (``div_rn``: Triton's plain fp32 ``/`` is approximate on the GPU), and q is
rounded to e4m3's grid (nearest, ties to even, as torch's cast) in fp32 before the cast, which is then exact (the
interpreter's own fp32 -> fp8 cast mis-rounds values just below a power of two).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from indexcache.kernels.fp8_linear.reference import BLOCK, FP8, FP8_MAX, _TINY, blocks

BLOCK_R = 32  # rows per program: 32 x 128 values per tile, a few KB in flight per program (memory-bound)


@triton.jit
def _round_to_e4m3(v):
    """v (|v| <= 448, fp32) rounded to nearest-even on e4m3's grid, in fp32: the step is 2^(e - 3) for a binary
    exponent e >= -6 and 2^-9 below (subnormals); the sign is kept (-0 stays -0, as in torch's cast). The cast
    to fp8 after it is then exact."""
    bits = v.to(tl.int32, bitcast=True)
    e = tl.maximum(((bits >> 23) & 0xFF) - 127, -6) - 3
    step = ((e + 127) << 23).to(tl.float32, bitcast=True)
    r = tl.abs(v) * ((127 - e) << 23).to(tl.float32, bitcast=True)  # times 1 / step (powers of two: exact), < 16
    r = (r + 12582912.0) - 12582912.0  # 1.5 * 2^23: fp32 addition rounds r to an integer, ties to even
    r = (r * step).to(tl.int32, bitcast=True) | (bits & -2147483648)
    return r.to(tl.float32, bitcast=True)


@triton.jit
def _act_quant_kernel(x_ptr, q_ptr, s_ptr, M, MP, K, stride_xm, stride_xk, stride_qm, stride_sm, stride_sk,
                      TINY: tl.constexpr, QMAX: tl.constexpr, BLOCK_R: tl.constexpr, GROUP: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    grp = tl.program_id(1)
    cols = grp * GROUP + tl.arange(0, GROUP)
    kmask = cols < K
    rows64 = rows.to(tl.int64)
    x = tl.load(x_ptr + rows64[:, None] * stride_xm + cols[None, :] * stride_xk,
                mask=(rows < M)[:, None] & kmask[None, :], other=0.0).to(tl.float32)
    amax = tl.maximum(tl.max(tl.abs(x), axis=1), TINY)
    scale = tl.math.div_rn(amax, tl.full([BLOCK_R], QMAX, tl.float32))
    q = tl.math.div_rn(x, scale[:, None])
    q = _round_to_e4m3(tl.minimum(tl.maximum(q, -QMAX), QMAX))
    # rows M..Mp-1 get zeros and the all-zero group's scale
    live = rows < MP
    tl.store(q_ptr + rows64[:, None] * stride_qm + cols[None, :], q.to(q_ptr.dtype.element_ty),
             mask=live[:, None] & kmask[None, :])
    tl.store(s_ptr + rows64 * stride_sm + grp * stride_sk, scale, mask=live)


def quantize_act_triton(x: torch.Tensor, pad_rows_to: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] float32/float16/bfloat16 (any strides) -> (q fp8 e4m3 [Mp, K], scale fp32 [Mp, ceil(K/128)]
    with strides (1, Mp)), Mp = M rounded up to ``pad_rows_to``; padding rows are zero."""
    if x.dim() != 2 or x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"quantize_act: x must be [M, K] float32/float16/bfloat16, got {tuple(x.shape)} {x.dtype}")
    if pad_rows_to < 1:
        raise ValueError(f"quantize_act: pad_rows_to must be >= 1, got {pad_rows_to}")
    m, k = x.shape
    mp = -(-m // pad_rows_to) * pad_rows_to
    kb = blocks(k)
    q = torch.empty(mp, k, dtype=FP8, device=x.device)
    scale = torch.empty_strided((mp, kb), (1, mp), dtype=torch.float32, device=x.device)
    if mp == 0 or k == 0:
        return q, scale
    grid = (triton.cdiv(mp, BLOCK_R), kb)
    _act_quant_kernel[grid](x, q, scale, m, mp, k, x.stride(0), x.stride(1), q.stride(0), *scale.stride(),
                            TINY=_TINY, QMAX=FP8_MAX, BLOCK_R=BLOCK_R, GROUP=BLOCK, num_warps=4)
    return q, scale
