"""FP8 block-scaled linear: checks and dispatch.

On a Hopper GPU (compute capability 9.x: torch's DeepSeek-style block-scaled GEMM exists only there) the
activations are quantised per 1x128 group by one Triton pass (triton.py: it writes the fp8 values and the scales
in scaled_mm's layouts, padding included; as separate torch ops the quantisation cost up to 4x the GEMM) and
``torch.nn.functional.scaled_mm`` runs with (BlockWise1x128, BlockWise128x128) scales. Both sit in one custom op,
opaque to torch.compile: the compiled decode graphs call it as is (two launches).
Its scale layouts: scale_a (M, K/128) with strides (1, M); scale_b (L4, N/128) with strides (1, L4), where
L4 = K/128 rounded up to a multiple of 4 (torch's check; the padding rows are never read for data). M is padded
to a multiple of 4 so scale_a's columns start 16-byte aligned.
Shapes the GPU path does not take, run the reference instead (stated, not silent, in ``gpu_path_reason``):
K not a multiple of 128 (the activation groups would straddle weight blocks' partial tails), N not a multiple of
16 (fp8 GEMM alignment). N not a multiple of 128 (kv_a_proj's 576) IS taken: the last weight block is partial.
Small M (at most SMALL_M_MAX rows: decode batches) takes neither: there the GEMM is a weight read, and the
activation quantisation plus scaled_mm cost several times bf16's F.linear, so a Triton weight-only kernel
(triton.py ``fp8_gemv_triton``: bf16 x, fp8 weight dequantised per tile, fp32 accumulation, split-K) reads the
fp8 bytes once. It does not quantise x: its result is ``fp8_linear_weight_only_reference``'s (closer to the
unquantised product than scaled_mm's), on any N and K. It needs a GPU whose Triton converts e4m3 (compute
capability >= 8.9). It is its own custom op, opaque to torch.compile, one or two launches.
Elsewhere (CPU, other GPUs) the reference runs: dequantise, then matmul.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from indexcache.kernels.fp8_linear.reference import (BLOCK, FP8, FP8_MAX, blocks, check_weight, scale_from_amax,
                                                     fp8_linear_reference, quantize_act_reference)
from indexcache.kernels.fp8_linear.triton import GEMV_BLOCK_M, fp8_gemv_triton, quantize_act_triton

# Rows up to which fp8_linear runs the weight-only kernel on CUDA instead of act-quant + scaled_mm. 16 is the
# kernel's tile height (at most GEMV_BLOCK_M); the crossover is to be confirmed on the GPU (benchmarks/fp8_weights).
SMALL_M_MAX = 16
assert SMALL_M_MAX <= GEMV_BLOCK_M


def block_scaled_mm_available(device) -> bool:
    """torch's (1x128, 128x128) block-scaled GEMM runs on this device (Hopper, compute capability 9.x)."""
    device = torch.device(device)
    if device.type != "cuda" or not hasattr(F, "scaled_mm"):
        return False
    return _capability_major(device.index if device.index is not None else torch.cuda.current_device()) == 9


@torch.compiler.assume_constant_result  # a fixed fact of the device: compiled decode glue does not re-check it
def _capability_major(index: int) -> int:
    return torch.cuda.get_device_capability(index)[0]


@torch.compiler.assume_constant_result
def _capability(index: int) -> int:
    major, minor = torch.cuda.get_device_capability(index)
    return 10 * major + minor


def small_m_path(x: torch.Tensor, w: torch.Tensor) -> bool:
    """True when ``fp8_linear`` runs the weight-only Triton kernel for these operands: x on a CUDA GPU of compute
    capability >= 8.9 with at most SMALL_M_MAX rows (x [..., K] flattened), weight rows contiguous."""
    if x.device.type != "cuda" or w.stride(-1) != 1:
        return False
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if rows > SMALL_M_MAX:
        return False
    return _capability(x.device.index if x.device.index is not None else torch.cuda.current_device()) >= 89


@torch.library.custom_op("indexcache::fp8_weight_only_mm", mutates_args=())
def weight_only_mm(x: torch.Tensor, w: torch.Tensor, scale_inv: torch.Tensor) -> torch.Tensor:
    """x [M <= 16, K] (CUDA, float) @ dequant(w fp8 [N, K], scale_inv)^T -> [M, N] in x's dtype (a fresh tensor)."""
    return fp8_gemv_triton(x, w, scale_inv)


@weight_only_mm.register_fake
def _(x, w, scale_inv):
    return x.new_empty(x.shape[0], w.shape[0])


def gpu_path_reason(x: torch.Tensor, w: torch.Tensor) -> str | None:
    """None when ``fp8_linear`` runs scaled_mm for these operands, else why it runs the reference."""
    if not block_scaled_mm_available(x.device):
        return f"no block-scaled FP8 GEMM on {x.device} (needs a compute-capability 9.x GPU)"
    n, k = w.shape
    if k % BLOCK:
        return f"K={k} is not a multiple of {BLOCK}"
    if n % 16:
        return f"N={n} is not a multiple of 16"
    return None


def quantize_act(x: torch.Tensor, pad_rows_to: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (q fp8 [Mp, K], scale fp32 [Mp, ceil(K/128)] with strides (1, Mp)), Mp = M rounded up to
    ``pad_rows_to``; padding rows are zero. The layout scaled_mm wants for scale_a; the same values as
    ``quantize_act_reference``. The Triton pass on CUDA; torch ops elsewhere."""
    if x.is_cuda:
        return quantize_act_triton(x, pad_rows_to)
    m, k = x.shape
    mp = -(-m // pad_rows_to) * pad_rows_to
    if mp != m:
        x = F.pad(x, (0, 0, 0, mp - m))
    if k % BLOCK:
        q, scale = quantize_act_reference(x)
        return q, scale.t().contiguous().t()
    g = x.float().view(mp, k // BLOCK, BLOCK)
    scale = scale_from_amax(g.abs().amax(-1))
    q = (g / scale[..., None]).clamp(-FP8_MAX, FP8_MAX).view(mp, k).to(FP8)
    return q, scale.t().contiguous().t()


def weight_scale_for_mm(scale_inv: torch.Tensor) -> torch.Tensor:
    """scale_inv [N/128, K/128] -> (L4, N/128) with strides (1, L4), L4 = K/128 rounded up to 4."""
    kb = scale_inv.shape[1]
    l4 = -(-kb // 4) * 4
    s = scale_inv.float()
    if l4 != kb:
        s = F.pad(s, (0, l4 - kb), value=1.0)
    return s.contiguous().t()


@torch.library.custom_op("indexcache::fp8_act_quant_mm", mutates_args=())
def act_quant_mm(x: torch.Tensor, w: torch.Tensor, scale_b: torch.Tensor) -> torch.Tensor:
    """x [M, K] (CUDA, float) quantised per 1x128 group, M padded to Mp (a multiple of 4), then @ w fp8 [N, K]^T
    (scale_b from weight_scale_for_mm) by scaled_mm -> bf16 [Mp, N] (the caller drops the padding rows: a fresh
    output, never a view, keeps the op simple for torch.compile)."""
    q, scale_a = quantize_act_triton(x, pad_rows_to=4)
    return F.scaled_mm(q, w.t(), scale_a, F.ScalingType.BlockWise1x128, scale_b, F.ScalingType.BlockWise128x128,
                       output_dtype=torch.bfloat16)


@act_quant_mm.register_fake
def _(x, w, scale_b):
    return x.new_empty((x.shape[0] + 3) // 4 * 4, w.shape[0], dtype=torch.bfloat16)


def fp8_linear(x: torch.Tensor, w: torch.Tensor, scale_inv: torch.Tensor, out_dtype: torch.dtype | None = None,
               scale_for_mm: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ W^T with W fp8 e4m3 [N, K] and its 128x128 block ``scale_inv``; x [..., K] -> y [..., N] in
    ``out_dtype`` (default x.dtype). On CUDA with at most SMALL_M_MAX rows: the weight-only kernel (x not
    quantised); else act-quant + scaled_mm, or the reference. ``scale_for_mm``: ``weight_scale_for_mm(scale_inv)`` made once by the caller
    (saves a tiny copy per call)."""
    if w.dtype != FP8:
        raise ValueError(f"fp8_linear: weight must be float8_e4m3fn, got {w.dtype}")
    check_weight("fp8_linear", w, scale_inv)
    if x.shape[-1] != w.shape[1]:
        raise ValueError(f"fp8_linear: x has {x.shape[-1]} input features, the weight {w.shape[1]}")
    if x.device != w.device or scale_inv.device != w.device:
        raise ValueError(f"fp8_linear: x on {x.device}, weight on {w.device}, scale_inv on {scale_inv.device}")
    if small_m_path(x, w):
        lead = x.shape[:-1]
        y = weight_only_mm(x.reshape(-1, x.shape[-1]), w, scale_inv)
        return y.to(out_dtype or x.dtype).view(*lead, w.shape[0])
    if gpu_path_reason(x, w) is not None:
        return fp8_linear_reference(x, w, scale_inv, out_dtype)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    m = x2.shape[0]
    if m == 0:
        return x.new_empty(*lead, w.shape[0], dtype=out_dtype or x.dtype)
    sb = scale_for_mm if scale_for_mm is not None else weight_scale_for_mm(scale_inv)
    y = act_quant_mm(x2, w, sb)
    if y.shape[0] != m:
        y = y[:m]
    return y.to(out_dtype or x.dtype).view(*lead, w.shape[0])


__all__ = ["BLOCK", "SMALL_M_MAX", "blocks", "block_scaled_mm_available", "gpu_path_reason", "small_m_path",
           "weight_only_mm", "quantize_act",
           "weight_scale_for_mm", "fp8_linear"]
