"""PyTorch reference for the grouped GEMM against FP8 block-scaled expert weights, and the input checks.

    out[r] = a[r] @ W_e^T,  W_e = w[e] * scale_inv[e, n // 128, k // 128],  for the rows r of group e

a [M, K] (rows sorted by group: group e owns the counts[e] rows after those of groups < e), counts [E] int,
w fp8 e4m3 [E, N, K], scale_inv fp32 [E, ceil(N/128), ceil(K/128)] -> out [M, N] in a.dtype, fp32 accumulation.
The activations are not quantised (FP8 weights, bf16 activations): the weights' bytes halve, the maths is the
dequantised weight's.
"""
from __future__ import annotations

import torch

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def check_grouped_inputs(name, a, counts, w, scale_inv):
    """Shapes, dtypes and devices (host metadata only). counts summing to M is NOT checked (a device sync)."""
    if a.dim() != 2 or a.dtype not in _FLOATS:
        raise ValueError(f"{name}: a must be [M, K] float32/float16/bfloat16, got {tuple(a.shape)} {a.dtype}")
    if w.dim() != 3 or w.dtype != torch.float8_e4m3fn or w.shape[2] != a.shape[1]:
        raise ValueError(f"{name}: w must be float8_e4m3fn [E, N, K] with K={a.shape[1]}, got {tuple(w.shape)} "
                         f"{w.dtype}")
    e, n, k = w.shape
    want = (e, -(-n // 128), -(-k // 128))
    if tuple(scale_inv.shape) != want or scale_inv.dtype != torch.float32:
        raise ValueError(f"{name}: scale_inv must be float32 {want}, got {tuple(scale_inv.shape)} {scale_inv.dtype}")
    if counts.dim() != 1 or counts.shape[0] != e or counts.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{name}: counts must be int32/int64 [E={e}], got {tuple(counts.shape)} {counts.dtype}")
    for what, t in (("counts", counts), ("w", w), ("scale_inv", scale_inv)):
        if t.device != a.device:
            raise ValueError(f"{name}: {what} is on {t.device}, a on {a.device}")


def dequantize_expert(w_e: torch.Tensor, s_e: torch.Tensor) -> torch.Tensor:
    """One expert's [N, K] fp32 weight from fp8 and its [ceil(N/128), ceil(K/128)] block scales."""
    n, k = w_e.shape
    s = s_e.float().repeat_interleave(128, 0)[:n].repeat_interleave(128, 1)[:, :k]
    return w_e.float() * s


def fp8_grouped_mm_reference(a, counts, w, scale_inv):
    check_grouped_inputs("fp8_grouped_mm_reference", a, counts, w, scale_inv)
    out = torch.zeros(a.shape[0], w.shape[1], dtype=torch.float32, device=a.device)
    start = 0
    for e, c in enumerate(counts.tolist()):
        if c:
            out[start:start + c] = a[start:start + c].float() @ dequantize_expert(w[e], scale_inv[e]).t()
        start += c
    return out.to(a.dtype)
