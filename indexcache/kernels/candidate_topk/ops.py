"""Re-rank scoring: ``candidate_logits`` (a re-rank layer's indexer logits over per-query candidate pools of slot
ids in the paged FP8 key cache) and ``candidate_topk`` (their top-k, as slot ids). Triton on CUDA tensors (or on
CPU under TRITON_INTERPRET=1), the PyTorch reference otherwise; the top-k step is ``kernels.topk.topk_rows``."""
from __future__ import annotations

import torch

from indexcache.kernels._dispatch import use_triton
from indexcache.kernels.candidate_topk.reference import candidate_logits_reference
from indexcache.kernels.formats import INDEX_DIM, check_indexer_cache
from indexcache.kernels.topk import topk_rows


def _check(q_fp8, w, kv_cache, cand):
    if q_fp8.dim() != 3 or q_fp8.shape[2] != INDEX_DIM or q_fp8.dtype != torch.float8_e4m3fn:
        raise ValueError(f"candidate_logits: q_fp8 must be [T,H,{INDEX_DIM}] float8_e4m3fn, got "
                         f"{tuple(q_fp8.shape)} {q_fp8.dtype}")
    t, h, _ = q_fp8.shape
    if tuple(w.shape) != (t, h) or w.dtype != torch.float32:
        raise ValueError(f"candidate_logits: w must be [T,H]=({t},{h}) float32, got {tuple(w.shape)} {w.dtype}")
    check_indexer_cache(kv_cache)
    if cand.dim() != 2 or cand.shape[0] != t or cand.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"candidate_logits: cand must be [T={t}, c] int32 slot ids (-1 = none), got "
                         f"{tuple(cand.shape)} {cand.dtype}")
    # a value check reads the device: skipped while a CUDA graph is captured (decode)
    capturing = cand.is_cuda and torch.cuda.is_current_stream_capturing()
    if cand.numel() and not capturing and int(cand.max()) >= kv_cache.shape[0] * 64:
        raise ValueError(f"candidate_logits: slot id {int(cand.max())} is past the cache's "
                         f"{kv_cache.shape[0] * 64} slots")


def candidate_logits(q_fp8, w, kv_cache, cand, *, out=None, config=None) -> torch.Tensor:
    """logits [T,c] fp32 of each row's candidates (-inf where cand is -1); see ``reference`` for the formula."""
    _check(q_fp8, w, kv_cache, cand)
    if use_triton(q_fp8):
        from indexcache.kernels.candidate_topk.triton import candidate_logits_triton

        return candidate_logits_triton(q_fp8, w, kv_cache, cand.to(torch.int32), out=out, config=config)
    logits = candidate_logits_reference(q_fp8, w, kv_cache, cand)
    if out is None:
        return logits
    out.copy_(logits)
    return out


def candidate_topk(q_fp8, w, kv_cache, cand, k: int) -> torch.Tensor:
    """[T,k] int32 slot ids: each row's k best candidates (-1 padded where fewer are valid; ties go to the earlier
    pool entry)."""
    logits = candidate_logits(q_fp8, w, kv_cache, cand)
    col = topk_rows(logits, k)
    return torch.where(col < 0, -1, cand.gather(1, col.clamp(min=0).long()).to(torch.int32))
