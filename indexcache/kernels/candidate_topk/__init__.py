"""Re-rank scoring (R layers): an indexer over per-query candidate pools of the paged FP8 key cache, and top-k;
``topk_ids`` is its selection alone (an F layer's top-k out of its pool). ``ops`` dispatches, ``reference`` is
plain PyTorch, ``triton`` holds the kernels."""
from indexcache.kernels.candidate_topk.ops import candidate_logits, candidate_topk, topk_ids
from indexcache.kernels.candidate_topk.reference import (candidate_logits_reference, candidate_topk_reference,
                                                        topk_ids_reference)

__all__ = ["candidate_logits", "candidate_topk", "topk_ids", "candidate_logits_reference",
           "candidate_topk_reference", "topk_ids_reference"]
