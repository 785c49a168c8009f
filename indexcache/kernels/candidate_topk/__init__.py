"""Re-rank scoring (R layers): an indexer over per-query candidate pools of the paged FP8 key cache, and top-k
(``topk_slots``: the selection of a pool of up to MAX_SHORT and the gather of its slot ids, one launch).
``ops`` dispatches, ``reference`` is plain PyTorch, ``triton`` holds the kernels."""
from indexcache.kernels.candidate_topk.ops import MAX_SHORT, candidate_logits, candidate_topk, topk_slots
from indexcache.kernels.candidate_topk.reference import (candidate_logits_reference, candidate_topk_reference,
                                                         topk_slots_reference)

__all__ = ["candidate_logits", "candidate_topk", "topk_slots", "candidate_logits_reference",
           "candidate_topk_reference", "topk_slots_reference", "MAX_SHORT"]
