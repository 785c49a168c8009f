"""Lightning indexer (DSA spec A2): FP8 quantisation, logits (prefill and paged decode), bounded-memory top-k.
``ops`` dispatches and plans, ``reference`` is plain PyTorch, ``triton`` holds the kernels (``gluon``: the
prefill logits kernel for Hopper)."""
from indexcache.kernels.indexer.ops import (
    SLOT_BYTES,
    SAMPLE_STRIDE,
    FUSED_MIN_CONTEXT_OVER_32_HEADS,
    FUSED_MIN_CONTEXT_UP_TO_32_HEADS,
    choose_prefill_path,
    default_topk_fn,
    fused_params,
    indexer_prefill_candidates,
    indexer_logits,
    indexer_logits_decode,
    indexer_topk_decode,
    indexer_topk_prefill,
    indexer_topk_prefill_fused,
    indexer_topk_prefill_two_pass,
    plan_fused_chunks,
    plan_prefill_chunks,
    prefill_logits_kernel,
    quantize_indexer_k,
    quantize_indexer_q,
    sample_columns,
    selection_slot_bytes,
)
from indexcache.kernels.indexer.reference import (
    hadamard_128,
    indexer_logits_fp32,
    indexer_logits_ref,
    indexer_topk_prefill_ref,
    prefill_candidates_ref,
    topk_recall,
    topk_rows_torch,
)

__all__ = [
    "hadamard_128", "quantize_indexer_q", "quantize_indexer_k", "indexer_logits", "indexer_topk_prefill",
    "indexer_logits_decode", "indexer_topk_decode", "default_topk_fn", "plan_prefill_chunks", "selection_slot_bytes",
    "topk_recall", "indexer_logits_ref", "indexer_logits_fp32", "topk_rows_torch", "SLOT_BYTES",
    "indexer_prefill_candidates", "prefill_candidates_ref", "indexer_topk_prefill_ref", "fused_params",
    "sample_columns", "plan_fused_chunks", "SAMPLE_STRIDE", "choose_prefill_path", "indexer_topk_prefill_fused",
    "indexer_topk_prefill_two_pass", "FUSED_MIN_CONTEXT_UP_TO_32_HEADS", "FUSED_MIN_CONTEXT_OVER_32_HEADS",
    "prefill_logits_kernel",
]
