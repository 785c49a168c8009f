"""Grouped GEMMs for routed experts held as FP8 e4m3 with 128x128 block scales (prefill batches)."""
from indexcache.kernels.fp8_grouped_mm.ops import fp8_grouped_mm, fp8_grouped_swiglu, plan_block_sizes
from indexcache.kernels.fp8_grouped_mm.reference import (dequantize_expert, fp8_grouped_mm_reference,
                                                         fp8_grouped_swiglu_reference)

__all__ = ["fp8_grouped_mm", "fp8_grouped_swiglu", "plan_block_sizes", "fp8_grouped_mm_reference", "fp8_grouped_swiglu_reference",
           "dequantize_expert"]
