"""Re-rank scoring (R layers): an indexer over per-query candidate pools of the paged FP8 key cache, and top-k.
``ops`` dispatches, ``reference`` is plain PyTorch, ``triton`` holds the kernel."""
from indexcache.kernels.candidate_topk.ops import candidate_logits, candidate_topk
from indexcache.kernels.candidate_topk.reference import candidate_logits_reference, candidate_topk_reference

__all__ = ["candidate_logits", "candidate_topk", "candidate_logits_reference", "candidate_topk_reference"]
