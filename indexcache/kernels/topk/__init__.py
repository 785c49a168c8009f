"""Exact per-row top-k (``topk_rows``; ``topk_rows_decode`` for a few long rows; ``topk_pool_rows`` for re-rank
candidate pools wider than MAX_K; ``topk_and_pool_rows`` for a top-k and a pool from one read of the row): ``ops``
checks and plans the launches, ``reference`` is plain PyTorch, ``triton`` holds the kernels."""
from indexcache.kernels.topk.ops import (MAX_K, MAX_POOL, DecodeTopkWorkspace, bracket_stats, plan_decode_launches,
                                         plan_launches, pool_scratch_bytes_per_row, scratch_bytes_per_row,
                                         topk_and_pool_rows, topk_and_pool_scratch_bytes_per_row, topk_pool_rows,
                                         topk_rows, topk_rows_decode)
from indexcache.kernels.topk.reference import topk_rows_reference

__all__ = ["topk_rows", "topk_rows_decode", "topk_pool_rows", "topk_and_pool_rows",
           "topk_and_pool_scratch_bytes_per_row", "DecodeTopkWorkspace", "topk_rows_reference", "MAX_K",
           "MAX_POOL", "scratch_bytes_per_row", "pool_scratch_bytes_per_row", "bracket_stats", "plan_launches",
           "plan_decode_launches"]
