"""Plain PyTorch reference for re-rank scoring: a re-rank (R) layer's indexer over a per-query candidate pool.

Each query row t has its own candidates: slot ids into the paged FP8 indexer-key cache (``kernels.formats``: 132 B
per token), -1 = no candidate. logits[t, j] = k_scale * sum_h w[t, h] * relu(q_fp8[t, h] . k_fp8[cand[t, j]]), the
same score as ``kernels.indexer`` (w folded with the q scale, see ``quantize_indexer_q``); -inf where cand is -1.
"""
from __future__ import annotations

import torch

from indexcache.kernels.formats import gather_indexer_k
from indexcache.kernels.topk.reference import topk_rows_reference


def candidate_logits_reference(q_fp8: torch.Tensor, w: torch.Tensor, kv_cache: torch.Tensor,
                               cand: torch.Tensor) -> torch.Tensor:
    """q_fp8 [T,H,128] e4m3, w [T,H] fp32, kv_cache uint8 [pages, 8448], cand [T,c] int -> logits [T,c] fp32."""
    valid = cand >= 0
    k8, ks = gather_indexer_k(kv_cache, cand.clamp(min=0).reshape(-1))
    k = k8.float().view(*cand.shape, -1)  # [T,c,128]
    dots = torch.einsum("thd,tcd->thc", q_fp8.float(), k)
    logits = torch.einsum("th,thc->tc", w.float(), dots.clamp_min(0)) * ks.view(cand.shape)
    return logits.masked_fill(~valid, float("-inf"))


def candidate_topk_reference(q_fp8, w, kv_cache, cand, k: int) -> torch.Tensor:
    """[T,k] int32: the candidates (slot ids) with the k largest logits per row, -1 padded; ties go to the
    earlier pool entry."""
    logits = candidate_logits_reference(q_fp8, w, kv_cache, cand)
    c = logits.shape[1]
    # stable descending order: ties keep pool order
    order = torch.sort(logits, dim=1, descending=True, stable=True).indices[:, : min(k, c)]
    vals = logits.gather(1, order)
    out = cand.gather(1, order).to(torch.int32).masked_fill(vals == float("-inf"), -1)
    if out.shape[1] < k:
        out = torch.nn.functional.pad(out, (0, k - out.shape[1]), value=-1)
    return out


def topk_slots_reference(logits: torch.Tensor, cand: torch.Tensor, k: int) -> torch.Tensor:
    """[T,k] int32: the slot ids cand[t, j] of ``topk_rows``'s selection of logits[t] (the k largest valid values,
    ties to the lower column, NaN / -inf never), in pool order (ascending j), then -1 padding."""
    col = topk_rows_reference(logits, k).long()
    big = logits.shape[1]
    j = torch.where(col < 0, big, col).sort(1).values      # pool order, the padding last
    # a column past the pool (the padding) reads a -1 appended to each row
    padded = torch.nn.functional.pad(cand.long(), (0, 1), value=-1)
    return padded.gather(1, j).to(torch.int32)


def topk_of_pool_reference(logits: torch.Tensor, pool: torch.Tensor, k: int) -> torch.Tensor:
    """[R,k] int32: the ids of pool [R, c] (column ids of logits [R, L], -1 or >= L = none) with the k largest
    logits[r, id], ties to the lower id, NaN / -inf never, in pool order, then -1 padding."""
    ids = pool.long()
    ok = (ids >= 0) & (ids < logits.shape[1])
    vals = logits.float().gather(1, torch.where(ok, ids, 0)) + 0.0          # -0.0 ties +0.0
    vals = torch.where(ok & ~torch.isnan(vals), vals, float("-inf"))
    # rank by (value desc, id asc): a stable sort by id, then a stable sort by value
    by_id = torch.sort(torch.where(ok, ids, logits.shape[1]), dim=1, stable=True).indices
    order = by_id.gather(1, torch.sort(vals.gather(1, by_id), dim=1, descending=True, stable=True).indices)
    kk = min(k, ids.shape[1])
    chosen = torch.zeros_like(ok)
    chosen.scatter_(1, order[:, :kk], True)
    chosen &= vals != float("-inf")
    # the chosen ids in pool order, then -1 padding
    j = torch.where(chosen, torch.arange(ids.shape[1], device=ids.device), ids.shape[1]).sort(1).values
    padded = torch.nn.functional.pad(ids, (0, 1), value=-1)
    out = padded.gather(1, j[:, :kk]).to(torch.int32)
    if kk < k:
        out = torch.nn.functional.pad(out, (0, k - kk), value=-1)
    return out
