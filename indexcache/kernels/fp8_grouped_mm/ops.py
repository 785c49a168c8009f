"""Grouped GEMMs of expert-sorted fp8 rows against FP8 block-scaled expert weights: checks and dispatch (Triton on
CUDA or under TRITON_INTERPRET=1, the PyTorch reference otherwise)."""
from __future__ import annotations

import torch

from indexcache.kernels._dispatch import use_triton
from indexcache.kernels.fp8_linear.reference import blocks
from indexcache.kernels.fp8_grouped_mm.reference import (check_grouped_inputs, check_scatter, check_swiglu_weight,
                                                         fp8_grouped_mm_reference, fp8_grouped_swiglu_reference)


def fp8_grouped_mm(a, counts, w, scale_inv, a_scale, out_dtype=torch.bfloat16, out=None, *, a_rows=None,
                   out_rows=None, row_weight=None, plan=None, gemm="triton"):
    """a fp8 [Ma, K] with its 1x128 ``a_scale`` fp32 [Ma, ceil(K/128)] (``quantize_act``), counts [E], w fp8
    [E, N, K], scale_inv [E, ceil(N/128), ceil(K/128)] -> [M, N] in ``out_dtype`` (see reference.py). The M sorted
    rows are a's rows, or a[a_rows] with ``a_rows``; ``out_rows``/``row_weight`` store row r times row_weight[r]
    at out[out_rows[r]]. ``out``: optional [M, N] destination (may be a column slice). ``plan``: the layer's
    ``kernels.expert_plan`` result for these rows (its tile maps; the reference does not need it). ``gemm``:
    "triton", or "gluon" for the warp-specialised Hopper kernel (gluon.py: CUDA only, no ``a_rows``)."""
    check_grouped_inputs("fp8_grouped_mm", a, counts, w, scale_inv, a_scale, out_dtype, a_rows)
    m = a.shape[0] if a_rows is None else a_rows.shape[0]
    check_scatter("fp8_grouped_mm", m, out_rows, row_weight, a.device)
    if gemm not in ("triton", "gluon"):
        raise ValueError(f"fp8_grouped_mm: gemm must be 'triton' or 'gluon', got {gemm!r}")
    if gemm == "gluon":
        if not a.is_cuda:
            raise ValueError(f"fp8_grouped_mm: gemm='gluon' needs CUDA tensors (Gluon has no CPU interpreter), "
                             f"got {a.device}")
        from indexcache.kernels.fp8_grouped_mm.gluon import fp8_grouped_mm_gluon

        return fp8_grouped_mm_gluon(a, counts, w, scale_inv, a_scale, out=out, out_dtype=out_dtype, a_rows=a_rows,
                                    out_rows=out_rows, row_weight=row_weight, plan=plan)
    if use_triton(a):
        from indexcache.kernels.fp8_grouped_mm.triton import fp8_grouped_mm_triton

        return fp8_grouped_mm_triton(a, counts, w, scale_inv, a_scale, out=out, out_dtype=out_dtype, a_rows=a_rows,
                                     out_rows=out_rows, row_weight=row_weight, plan=plan)
    y = fp8_grouped_mm_reference(a, counts, w, scale_inv, a_scale, out_dtype, a_rows=a_rows, out_rows=out_rows,
                                 row_weight=row_weight)
    if out is None:
        return y
    out.copy_(y)
    return out


def fp8_grouped_swiglu(a, counts, w, scale_inv, a_scale, inter, *, a_rows=None, plan=None):
    """The MoE gate/up projection and its SwiGLU in one grouped GEMM: fp8 rows (a[a_rows] with ``a_rows``) against
    w fp8 [E, 2*inter, K] (gate's rows, then up's; scale_inv [E, 2*ceil(inter/128), ceil(K/128)]) ->
    (h fp8 [M, inter], h_scale fp32 [M, ceil(inter/128)]): silu(gate) * up quantised per 1x128 group, the down
    projection's input. The bf16 [M, 2*inter] gate/up product is never written. ``plan`` as for fp8_grouped_mm."""
    check_swiglu_weight("fp8_grouped_swiglu", w, inter)
    ib = blocks(inter)
    if scale_inv.dim() != 3 or scale_inv.shape[1] != 2 * ib:
        raise ValueError(f"fp8_grouped_swiglu: scale_inv must hold 2*ceil(inter/128)={2 * ib} block rows (gate's "
                         f"then up's), got {tuple(scale_inv.shape)}")
    check_grouped_inputs("fp8_grouped_swiglu", a, counts, w[:, :inter], scale_inv[:, :ib], a_scale, torch.float32,
                         a_rows)
    if use_triton(a):
        from indexcache.kernels.fp8_grouped_mm.triton import fp8_grouped_swiglu_triton

        return fp8_grouped_swiglu_triton(a, counts, w, scale_inv, a_scale, inter, a_rows=a_rows, plan=plan)
    return fp8_grouped_swiglu_reference(a, counts, w, scale_inv, a_scale, inter, a_rows=a_rows)


def plan_block_sizes(m: int, num_experts: int) -> tuple[int, int]:
    """Row-tile sizes of the gate/up and down kernels for m sorted rows (the tile maps an expert plan holds)."""
    from indexcache.kernels.fp8_grouped_mm.triton import plan_block_sizes as sizes

    return sizes(m, num_experts)
