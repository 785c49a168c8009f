"""Triton dequantisation of stacked FP8 expert weights into a bf16 (or fp32) scratch, for the alternative prefill
path that runs torch._grouped_mm on the dequantised weights (memory-bound: read 1 byte, write 2 per weight).

One program per 128x128 weight block: load the fp8 tile, multiply by its one fp32 scale, store in the scratch's
dtype. Ragged N or K (a partial last block) are masked. The PyTorch reference is ``dequantize_expert``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 128


@triton.jit
def _dequant_kernel(w_ptr, s_ptr, out_ptr, N, K, NB,
                    stride_we, stride_wn, stride_wk, stride_se, stride_sn, stride_sk, stride_oe, stride_on, stride_ok,
                    BLOCK: tl.constexpr):
    e = tl.program_id(0) // NB
    nb = tl.program_id(0) % NB
    kb = tl.program_id(1)
    rows = nb * BLOCK + tl.arange(0, BLOCK)
    cols = kb * BLOCK + tl.arange(0, BLOCK)
    mask = (rows < N)[:, None] & (cols < K)[None, :]
    e64 = e.to(tl.int64)
    w = tl.load(w_ptr + e64 * stride_we + rows.to(tl.int64)[:, None] * stride_wn + cols[None, :] * stride_wk,
                mask=mask, other=0.0)
    s = tl.load(s_ptr + e64 * stride_se + nb * stride_sn + kb * stride_sk)
    tl.store(out_ptr + e64 * stride_oe + rows.to(tl.int64)[:, None] * stride_on + cols[None, :] * stride_ok,
             (w.to(tl.float32) * s).to(out_ptr.dtype.element_ty), mask=mask)


def dequantize_experts_triton(w: torch.Tensor, scale_inv: torch.Tensor, out: torch.Tensor | None = None,
                              dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """w fp8 [E, N, K] (any strides), scale_inv fp32 [E, ceil(N/128), ceil(K/128)] -> [E, N, K] in ``dtype``
    (into ``out`` when given)."""
    if w.dim() != 3 or w.dtype != torch.float8_e4m3fn:
        raise ValueError(f"dequantize_experts: w must be float8_e4m3fn [E, N, K], got {tuple(w.shape)} {w.dtype}")
    E, n, k = w.shape
    want = (E, -(-n // BLOCK), -(-k // BLOCK))
    if tuple(scale_inv.shape) != want or scale_inv.dtype != torch.float32:
        raise ValueError(f"dequantize_experts: scale_inv must be float32 {want}, got {tuple(scale_inv.shape)} "
                         f"{scale_inv.dtype}")
    if out is None:
        out = torch.empty(E, n, k, dtype=dtype, device=w.device)
    elif tuple(out.shape) != (E, n, k):
        raise ValueError(f"dequantize_experts: out must be {(E, n, k)}, got {tuple(out.shape)}")
    if out.numel() == 0:
        return out
    grid = (E * want[1], want[2])
    _dequant_kernel[grid](w, scale_inv, out, n, k, want[1], *w.stride(), *scale_inv.stride(), *out.stride(),
                          BLOCK=BLOCK, num_warps=8)
    return out
