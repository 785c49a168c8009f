"""Lightning indexer (DSA spec A2): FP8 quantisation, logits (prefill and paged decode), bounded-memory top-k.
``ops`` dispatches and plans, ``reference`` is plain PyTorch, ``triton`` holds the kernels."""
from indexcache.kernels.indexer.ops import (
    SLOT_BYTES,
    default_topk_fn,
    indexer_logits,
    indexer_logits_decode,
    indexer_topk_decode,
    indexer_topk_prefill,
    plan_prefill_chunks,
    selection_slot_bytes,
)
from indexcache.kernels.indexer.reference import (
    hadamard_128,
    indexer_logits_fp32,
    indexer_logits_ref,
    quantize_indexer_k,
    quantize_indexer_q,
    topk_recall,
    topk_rows_torch,
)

__all__ = [
    "hadamard_128", "quantize_indexer_q", "quantize_indexer_k", "indexer_logits", "indexer_topk_prefill",
    "indexer_logits_decode", "indexer_topk_decode", "default_topk_fn", "plan_prefill_chunks", "selection_slot_bytes",
    "topk_recall", "indexer_logits_ref", "indexer_logits_fp32", "topk_rows_torch", "SLOT_BYTES",
]
