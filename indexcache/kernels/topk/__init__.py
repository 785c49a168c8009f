"""Exact per-row top-k (``topk_rows``; ``topk_rows_decode`` for a few long rows): ``ops`` / ``decode_ops`` check
and plan the launches, ``reference`` is plain PyTorch, ``triton`` / ``decode_triton`` hold the kernels."""
from indexcache.kernels.topk.decode_ops import DecodeTopkWorkspace, topk_rows_decode
from indexcache.kernels.topk.ops import MAX_K, bracket_stats, plan_launches, scratch_bytes_per_row, topk_rows
from indexcache.kernels.topk.reference import topk_rows_reference

__all__ = ["topk_rows", "topk_rows_decode", "DecodeTopkWorkspace", "topk_rows_reference", "MAX_K",
           "scratch_bytes_per_row", "bracket_stats", "plan_launches"]
