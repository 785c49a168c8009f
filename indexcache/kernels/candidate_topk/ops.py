"""Re-rank scoring: ``candidate_logits`` (a re-rank layer's indexer logits over per-query candidate pools of slot
ids in the paged FP8 key cache) and ``candidate_topk`` (their top-k, as slot ids). Triton on CUDA tensors (or on
CPU under TRITON_INTERPRET=1), the PyTorch reference otherwise. The top-k step: ``topk_slots`` (one launch: the
selection and the gather of slot ids) for pools of up to MAX_SHORT candidates, ``kernels.topk.topk_rows`` and a
gather for wider ones."""
from __future__ import annotations

import torch

from indexcache.kernels._dispatch import use_triton
from indexcache.kernels.candidate_topk.reference import candidate_logits_reference, topk_slots_reference
from indexcache.kernels.formats import INDEX_DIM, check_indexer_cache
from indexcache.kernels.topk import topk_rows

MAX_SHORT = 16384     # widest pool whose row ``topk_slots`` holds in registers


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


def candidate_topk(q_fp8, w, kv_cache, cand, k: int, *, tie_ids=None) -> torch.Tensor:
    """[T,k] int32 slot ids: each row's k best candidates (-1 padded where fewer are valid). Ties go to the earlier
    pool entry, or with ``tie_ids`` [T, c] (a re-rank layer passes its pool's key positions) to the lower tie id:
    the model's rule, lower position first, whatever the pool's order. Order within a row: pool order for pools of
    up to MAX_SHORT candidates, unspecified above."""
    logits = candidate_logits(q_fp8, w, kv_cache, cand)
    if cand.shape[1] <= MAX_SHORT:
        return topk_slots(logits, cand, k, tie_ids=tie_ids)
    if tie_ids is not None:  # pool entries in tie-id order (-1 last): topk_rows' lower column is then the rule
        order = torch.where(tie_ids < 0, torch.iinfo(torch.int32).max, tie_ids).argsort(dim=1, stable=True)
        logits, cand = logits.gather(1, order), cand.gather(1, order)
    col = topk_rows(logits, k)
    return torch.where(col < 0, -1, cand.gather(1, col.clamp(min=0).long()).to(torch.int32))


def _check_slots(logits, cand, k, out):
    if logits.dim() != 2 or logits.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"topk_slots: logits must be [T, c] float32/bfloat16/float16, got {tuple(logits.shape)} "
                         f"{logits.dtype}")
    t, c = logits.shape
    if tuple(cand.shape) != (t, c) or cand.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"topk_slots: cand must be [T, c]=({t}, {c}) int32/int64 slot ids, got {tuple(cand.shape)} "
                         f"{cand.dtype}")
    if cand.device != logits.device:
        raise ValueError(f"topk_slots: cand is on {cand.device}, logits on {logits.device}")
    if c > MAX_SHORT:
        raise ValueError(f"topk_slots: pools of at most {MAX_SHORT} candidates, got {c}")
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"topk_slots: k must be a positive int, got {k!r}")
    if out is not None and (tuple(out.shape) != (t, k) or out.dtype != torch.int32 or not out.is_contiguous()
                            or out.device != logits.device):
        raise ValueError(f"topk_slots: out must be a contiguous [T, k]=({t}, {k}) int32 tensor on {logits.device}, "
                         f"got {tuple(out.shape)} {out.dtype} on {out.device}")


def topk_slots(logits: torch.Tensor, cand: torch.Tensor, k: int, *, tie_ids=None, out=None,
               config=None) -> torch.Tensor:
    """[T,k] int32: the slot ids cand[t, j] of each row's k largest logits (``topk_rows``'s selection: exact, ties
    to the lower j, NaN / -inf never), in pool order, then -1 padding where fewer than k are valid. ``tie_ids``
    [T, c] int (distinct per row where valid): ties go to the lower tie id instead of the lower j. Pools of up to
    MAX_SHORT candidates; one launch on the GPU. ``config``: LB (log2 of the bins per round) / num_warps / PB
    overrides (tests, benchmarks)."""
    _check_slots(logits, cand, k, out)
    if tie_ids is not None and (tuple(tie_ids.shape) != tuple(cand.shape) or tie_ids.device != cand.device
                                or tie_ids.dtype not in (torch.int32, torch.int64)):
        raise ValueError(f"topk_slots: tie_ids must be int32/int64 of cand's shape {tuple(cand.shape)} on "
                         f"{cand.device}, got {tuple(tie_ids.shape)} {tie_ids.dtype} on {tie_ids.device}")
    if use_triton(logits):
        from indexcache.kernels.candidate_topk.triton import topk_slots_triton

        return topk_slots_triton(logits, cand, k, out=out, config=config, tie_ids=tie_ids)
    sel = topk_slots_reference(logits, cand, k, tie_ids)
    if out is None:
        return sel
    out.copy_(sel)
    return out
