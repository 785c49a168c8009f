"""One launch per RMSNorm: each program normalises a few rows held whole in registers (fp32 maths), optionally adds
the residual first and stores that sum too. The roundings are the reference's: the sum and the normalised row are
rounded to the input's dtype, the weight product to the output's."""
from __future__ import annotations

import triton
import triton.language as tl

@triton.jit(do_not_specialize=["T"])  # tokens per step vary (chunks, decode batches)
def _rms_norm_kernel(x_ptr, r_ptr, w_ptr, y_ptr, s_ptr, T, D, stride_x, stride_r, stride_y, stride_s, inv_d, eps,
                     HAS_RESIDUAL: tl.constexpr, BT: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * BT + tl.arange(0, BT)
    r64 = rows.to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    mask = (rows < T)[:, None] & (cols < D)[None, :]
    x = tl.load(x_ptr + r64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(r_ptr + r64[:, None] * stride_r + cols[None, :], mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)  # the sum in the stream's dtype, as torch rounds it
        tl.store(s_ptr + r64[:, None] * stride_s + cols[None, :], x, mask=mask)
    xf = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(xf * xf, axis=1) * inv_d + eps)  # the mean as torch takes it: sum * (1/D)
    n = (xf * rstd[:, None]).to(x.dtype).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=cols < D, other=0.0).to(tl.float32)
    tl.store(y_ptr + r64[:, None] * stride_y + cols[None, :], (n * w[None, :]).to(y_ptr.dtype.element_ty), mask=mask)


def rms_norm_triton(x, weight, eps, residual, y, s):
    T, D = x.shape
    if T == 0:
        return
    block_d = triton.next_power_of_2(D)
    bt = max(1, min(16, 2048 // block_d))  # several short rows per program, long rows alone
    r = residual if residual is not None else x
    s_ = s if s is not None else y
    _rms_norm_kernel[(triton.cdiv(T, bt),)](
        x, r, weight, y, s_, T, D, x.stride(0), r.stride(0), y.stride(0), s_.stride(0), 1.0 / D, float(eps),
        HAS_RESIDUAL=residual is not None, BT=bt, BLOCK_D=block_d, num_warps=4 if block_d <= 2048 else 8)

