"""PyTorch reference for the grouped GEMM against FP8 block-scaled expert weights, and the input checks.

    out[r] = a[r] @ W_e^T,  W_e = w[e] * scale_inv[e, n // 128, k // 128],  for the rows r of group e

a [M, K] (rows sorted by group: group e owns the counts[e] rows after those of groups < e), counts [E] int,
w fp8 e4m3 [E, N, K], scale_inv fp32 [E, ceil(N/128), ceil(K/128)] -> out [M, N] in ``out_dtype``, fp32
accumulation. The activations are fp8 e4m3 with per-row 1x128 group scales a_scale fp32 [M, ceil(K/128)]
(W8A8, as the FP8 linear layers: a = a_fp8 * a_scale[m, k // 128]). Keeping them bf16 (W8A16: the weight tile
converted in registers) measured slower on an H200 at every size and was removed.
"""
from __future__ import annotations

import torch

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def check_grouped_inputs(name, a, counts, w, scale_inv, a_scale, out_dtype):
    """Shapes, dtypes and devices (host metadata only). counts summing to M is NOT checked (a device sync)."""
    if a.dim() != 2 or a.dtype != torch.float8_e4m3fn:
        raise ValueError(f"{name}: a must be float8_e4m3fn [M, K] (quantize_act), got {tuple(a.shape)} {a.dtype}")
    want = (a.shape[0], -(-a.shape[1] // 128))
    if a_scale is None or tuple(a_scale.shape) != want or a_scale.dtype != torch.float32:
        raise ValueError(f"{name}: fp8 activations need a_scale float32 {want}, got "
                         f"{None if a_scale is None else (tuple(a_scale.shape), a_scale.dtype)}")
    if out_dtype not in _FLOATS:
        raise ValueError(f"{name}: out_dtype must be float32/float16/bfloat16, got {out_dtype}")
    if w.dim() != 3 or w.dtype != torch.float8_e4m3fn or w.shape[2] != a.shape[1]:
        raise ValueError(f"{name}: w must be float8_e4m3fn [E, N, K] with K={a.shape[1]}, got {tuple(w.shape)} "
                         f"{w.dtype}")
    e, n, k = w.shape
    want = (e, -(-n // 128), -(-k // 128))
    if tuple(scale_inv.shape) != want or scale_inv.dtype != torch.float32:
        raise ValueError(f"{name}: scale_inv must be float32 {want}, got {tuple(scale_inv.shape)} {scale_inv.dtype}")
    if counts.dim() != 1 or counts.shape[0] != e or counts.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{name}: counts must be int32/int64 [E={e}], got {tuple(counts.shape)} {counts.dtype}")
    for what, t in (("counts", counts), ("w", w), ("scale_inv", scale_inv), ("a_scale", a_scale)):
        if t is not None and t.device != a.device:
            raise ValueError(f"{name}: {what} is on {t.device}, a on {a.device}")


def dequantize_expert(w_e: torch.Tensor, s_e: torch.Tensor) -> torch.Tensor:
    """One expert's [N, K] fp32 weight from fp8 and its [ceil(N/128), ceil(K/128)] block scales."""
    n, k = w_e.shape
    s = s_e.float().repeat_interleave(128, 0)[:n].repeat_interleave(128, 1)[:, :k]
    return w_e.float() * s


def fp8_grouped_mm_reference(a, counts, w, scale_inv, a_scale, out_dtype=torch.bfloat16):
    check_grouped_inputs("fp8_grouped_mm_reference", a, counts, w, scale_inv, a_scale, out_dtype)
    af = a.float() * a_scale.float().repeat_interleave(128, 1)[:, : a.shape[1]]
    out = torch.zeros(a.shape[0], w.shape[1], dtype=torch.float32, device=a.device)
    start = 0
    for e, c in enumerate(counts.tolist()):
        if c:
            out[start:start + c] = af[start:start + c] @ dequantize_expert(w[e], scale_inv[e]).t()
        start += c
    return out.to(out_dtype)
