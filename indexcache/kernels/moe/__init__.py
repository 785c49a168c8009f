"""Routed MoE experts for decode batch sizes: a memory-bound Triton matvec kernel instead of torch._grouped_mm,
which is far from the copy bandwidth when only a few (token, slot) pairs are active. ``ops`` dispatches,
``reference`` is plain PyTorch, ``triton`` holds the kernels."""
from indexcache.kernels.moe.ops import SMALL_MAX_ROWS, moe_experts_small
from indexcache.kernels.moe.reference import moe_experts_small_reference

__all__ = ["SMALL_MAX_ROWS", "moe_experts_small", "moe_experts_small_reference"]
