"""Exact per-row top-k (``topk_rows``): ``ops`` checks and plans the launches, ``reference`` is plain PyTorch,
``triton`` holds the kernels."""
from indexcache.kernels.topk.ops import MAX_K, bracket_stats, plan_launches, scratch_bytes_per_row, topk_rows
from indexcache.kernels.topk.reference import topk_rows_reference

__all__ = ["topk_rows", "topk_rows_reference", "MAX_K", "scratch_bytes_per_row", "bracket_stats", "plan_launches"]
