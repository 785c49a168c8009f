"""Exact per-row top-k (``topk_rows``; ``topk_rows_decode`` for a few long rows): ``ops`` checks and plans the
launches, ``reference`` is plain PyTorch, ``triton`` holds the kernels."""
from indexcache.kernels.topk.ops import (MAX_K, MAX_POOL, DecodeTopkWorkspace, bracket_stats, plan_decode_launches,
                                         plan_launches, scratch_bytes_per_row, topk_pool_rows, topk_rows,
                                         topk_rows_decode)
from indexcache.kernels.topk.reference import topk_rows_reference

__all__ = ["topk_rows", "topk_rows_decode", "topk_pool_rows", "MAX_POOL", "DecodeTopkWorkspace", "topk_rows_reference",
           "MAX_K",
           "scratch_bytes_per_row", "bracket_stats", "plan_launches", "plan_decode_launches"]
