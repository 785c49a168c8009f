"""Dispatch for the routed experts at decode batch sizes:

    moe_experts_small(x [N, D], ids [N, K], weights [N, K], gate_up [E, 2I, D], down [E, D, I]) -> y [N, D]

Triton runs on CUDA tensors (or CPU under TRITON_INTERPRET=1), the PyTorch reference otherwise. Expert ids are
not range-checked (that would need a device sync); ids outside [0, E) are undefined behaviour in the kernel.
"""
from __future__ import annotations

from indexcache.kernels._dispatch import use_triton
from indexcache.kernels.moe.reference import check_moe_inputs, moe_experts_small_reference

# N*K up to which the engine should use this kernel: each pair re-reads its expert's weights (from L2 when
# pairs share an expert), so larger batches belong to the grouped GEMM.
SMALL_MAX_ROWS = 64


def moe_experts_small(x, ids, weights, gate_up, down, gate_up_scale=None, down_scale=None):
    """y[n] = sum_k weights[n,k] * down[e] @ (silu(gate_e @ x[n]) * (up_e @ x[n])), e = ids[n,k]; fp32
    accumulation, returned in x.dtype. FP8 experts pass their 128x128 block scales (reference.py's layout)."""
    check_moe_inputs("moe_experts_small", x, ids, weights, gate_up, down, gate_up_scale, down_scale)
    if use_triton(x):
        from indexcache.kernels.moe.triton import moe_experts_small_triton

        return moe_experts_small_triton(x, ids, weights, gate_up, down, gate_up_scale=gate_up_scale,
                                        down_scale=down_scale)
    return moe_experts_small_reference(x, ids, weights, gate_up, down, gate_up_scale, down_scale)
