"""PyTorch reference for the grouped GEMM against FP8 block-scaled expert weights, and the input checks.

    out[r] = a[r] @ W_e^T,  W_e = w[e] * scale_inv[e, n // 128, k // 128],  for the rows r of group e

a [M, K] (rows sorted by group: group e owns the counts[e] rows after those of groups < e), counts [E] int,
w fp8 e4m3 [E, N, K], scale_inv fp32 [E, ceil(N/128), ceil(K/128)] -> out [M, N] in ``out_dtype``, fp32
accumulation. The activations are fp8 e4m3 with per-row 1x128 group scales a_scale fp32 [M, ceil(K/128)]
(W8A8, as the FP8 linear layers: a = a_fp8 * a_scale[m, k // 128]). Keeping them bf16 (W8A16: the weight tile
converted in registers) measured slower on an H200 at every size and was removed.

Options for the MoE: ``a_rows`` gathers the sorted rows from ``a`` (row r reads a[a_rows[r]]: the token of each
(token, slot) pair, so the activations are quantised once per token, not once per pair); ``out_rows`` and
``row_weight`` store row r times row_weight[r] at out[out_rows[r]] (the down projection writes each pair weighted,
in (token, slot) order). ``fp8_grouped_swiglu_reference`` is the gate/up projection with its SwiGLU and the
1x128 quantisation of the result, in fp32: h = silu(x W_gate^T) * (x W_up^T), quantised as ``quantize_act``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from indexcache.kernels.fp8_linear.reference import blocks, quantize_act_reference

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def check_grouped_inputs(name, a, counts, w, scale_inv, a_scale, out_dtype, a_rows=None):
    """Shapes, dtypes and devices (host metadata only). counts summing to the sorted rows is NOT checked, nor that
    a_rows is in range (device syncs)."""
    if a.dim() != 2 or a.dtype != torch.float8_e4m3fn:
        raise ValueError(f"{name}: a must be float8_e4m3fn [M, K] (quantize_act), got {tuple(a.shape)} {a.dtype}")
    want = (a.shape[0], blocks(a.shape[1]))
    if a_scale is None or tuple(a_scale.shape) != want or a_scale.dtype != torch.float32:
        raise ValueError(f"{name}: fp8 activations need a_scale float32 {want}, got "
                         f"{None if a_scale is None else (tuple(a_scale.shape), a_scale.dtype)}")
    if out_dtype not in _FLOATS:
        raise ValueError(f"{name}: out_dtype must be float32/float16/bfloat16, got {out_dtype}")
    if w.dim() != 3 or w.dtype != torch.float8_e4m3fn or w.shape[2] != a.shape[1]:
        raise ValueError(f"{name}: w must be float8_e4m3fn [E, N, K] with K={a.shape[1]}, got {tuple(w.shape)} "
                         f"{w.dtype}")
    e, n, k = w.shape
    want = (e, blocks(n), blocks(k))
    if tuple(scale_inv.shape) != want or scale_inv.dtype != torch.float32:
        raise ValueError(f"{name}: scale_inv must be float32 {want}, got {tuple(scale_inv.shape)} {scale_inv.dtype}")
    if counts.dim() != 1 or counts.shape[0] != e or counts.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{name}: counts must be int32/int64 [E={e}], got {tuple(counts.shape)} {counts.dtype}")
    if a_rows is not None and (a_rows.dim() != 1 or a_rows.dtype not in (torch.int32, torch.int64)):
        raise ValueError(f"{name}: a_rows must be int32/int64 [M], got {tuple(a_rows.shape)} {a_rows.dtype}")
    for what, t in (("counts", counts), ("w", w), ("scale_inv", scale_inv), ("a_scale", a_scale),
                    ("a_rows", a_rows)):
        if t is not None and t.device != a.device:
            raise ValueError(f"{name}: {what} is on {t.device}, a on {a.device}")


def dequantize_expert(w_e: torch.Tensor, s_e: torch.Tensor) -> torch.Tensor:
    """One expert's [N, K] fp32 weight from fp8 and its [ceil(N/128), ceil(K/128)] block scales."""
    n, k = w_e.shape
    s = s_e.float().repeat_interleave(128, 0)[:n].repeat_interleave(128, 1)[:, :k]
    return w_e.float() * s


def check_scatter(name, m, out_rows, row_weight, device):
    """out_rows and row_weight come together, one per sorted row."""
    if (out_rows is None) != (row_weight is None):
        raise ValueError(f"{name}: out_rows and row_weight go together")
    if out_rows is None:
        return
    if out_rows.shape != (m,) or out_rows.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{name}: out_rows must be int32/int64 [{m}], got {tuple(out_rows.shape)} {out_rows.dtype}")
    if row_weight.shape != (m,) or row_weight.dtype != torch.float32:
        raise ValueError(f"{name}: row_weight must be float32 [{m}], got {tuple(row_weight.shape)} "
                         f"{row_weight.dtype}")
    for what, t in (("out_rows", out_rows), ("row_weight", row_weight)):
        if t.device != device:
            raise ValueError(f"{name}: {what} is on {t.device}, a on {device}")


def _sorted_rows(a, a_scale, a_rows):
    """The sorted rows' activations dequantised to fp32 [M, K]."""
    if a_rows is not None:
        a, a_scale = a[a_rows.long()], a_scale[a_rows.long()]
    return a.float() * a_scale.float().repeat_interleave(128, 1)[:, : a.shape[1]]


def _grouped_fp32(af, counts, w, scale_inv):
    out = torch.zeros(af.shape[0], w.shape[1], dtype=torch.float32, device=af.device)
    start = 0
    for e, c in enumerate(counts.tolist()):
        if c:
            out[start:start + c] = af[start:start + c] @ dequantize_expert(w[e], scale_inv[e]).t()
        start += c
    return out


def fp8_grouped_mm_reference(a, counts, w, scale_inv, a_scale, out_dtype=torch.bfloat16, *, a_rows=None,
                             out_rows=None, row_weight=None):
    check_grouped_inputs("fp8_grouped_mm_reference", a, counts, w, scale_inv, a_scale, out_dtype, a_rows)
    out = _grouped_fp32(_sorted_rows(a, a_scale, a_rows), counts, w, scale_inv)
    check_scatter("fp8_grouped_mm_reference", out.shape[0], out_rows, row_weight, a.device)
    if out_rows is not None:
        out = torch.empty_like(out).index_copy_(0, out_rows.long(), out * row_weight[:, None])
    return out.to(out_dtype)


def check_swiglu_weight(name, w, inter):
    if w.dim() != 3 or w.shape[1] != 2 * inter:
        raise ValueError(f"{name}: w must be [E, 2*inter={2 * inter}, K] (gate rows, then up rows), got "
                         f"{tuple(w.shape)}")


def fp8_grouped_swiglu_reference(a, counts, w, scale_inv, a_scale, inter, *, a_rows=None):
    """-> (h fp8 [M, inter], h_scale fp32 [M, ceil(inter/128)]): silu(gate) * up in fp32 for each sorted row,
    quantised per 1x128 group. w [E, 2*inter, K] holds gate's rows then up's, scale_inv gate's blocks then up's
    ([E, 2*ceil(inter/128), ceil(K/128)])."""
    check_swiglu_weight("fp8_grouped_swiglu_reference", w, inter)
    ib = blocks(inter)
    check_grouped_inputs("fp8_grouped_swiglu_reference", a, counts, w[:, :inter], scale_inv[:, :ib], a_scale,
                         torch.float32, a_rows)
    af = _sorted_rows(a, a_scale, a_rows)
    gate = _grouped_fp32(af, counts, w[:, :inter], scale_inv[:, :ib])
    up = _grouped_fp32(af, counts, w[:, inter:], scale_inv[:, ib:])
    return quantize_act_reference(F.silu(gate) * up)
