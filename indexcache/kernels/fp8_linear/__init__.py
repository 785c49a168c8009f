"""FP8 e4m3 linear layers with DeepSeek's 128x128 weight block scales and 1x128 activation scales."""
from indexcache.kernels.fp8_linear.ops import (SMALL_M_MAX, block_scaled_mm_available, fp8_linear, gpu_path_reason,
                                               quantize_act, small_m_path, weight_only_mm, weight_scale_for_mm)
from indexcache.kernels.fp8_linear.reference import (BLOCK, FP8, blocks, dequantize_act, dequantize_weight,
                                                     fp8_linear_reference, fp8_linear_weight_only_reference,
                                                     quantize_act_reference, quantize_weight)
from indexcache.kernels.fp8_linear.triton import fp8_gemv_triton

__all__ = ["BLOCK", "FP8", "SMALL_M_MAX", "blocks", "block_scaled_mm_available", "fp8_linear", "fp8_gemv_triton",
           "fp8_linear_weight_only_reference", "gpu_path_reason", "quantize_act", "small_m_path", "weight_only_mm",
           "weight_scale_for_mm", "dequantize_act", "dequantize_weight", "fp8_linear_reference",
           "quantize_act_reference", "quantize_weight"]
