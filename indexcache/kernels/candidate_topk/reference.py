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


def candidate_topk_reference(q_fp8, w, kv_cache, cand, k: int, tie_ids=None) -> torch.Tensor:
    """[T,k] int32: the candidates (slot ids) with the k largest logits per row, in pool order, -1 padded; ties go
    to the earlier pool entry, or with ``tie_ids`` [T, c] to the lower tie id."""
    logits = candidate_logits_reference(q_fp8, w, kv_cache, cand)
    if tie_ids is None:
        tie_ids = torch.arange(cand.shape[1], device=cand.device).expand(cand.shape)
    return _in_pool_order(cand.long(), _chosen(logits, tie_ids.long(), k), k)


def topk_slots_reference(logits: torch.Tensor, cand: torch.Tensor, k: int,
                         tie_ids: torch.Tensor | None = None) -> torch.Tensor:
    """[T,k] int32: the slot ids cand[t, j] of ``topk_rows``'s selection of logits[t] (the k largest valid values,
    ties to the lower column, NaN / -inf never), in pool order (ascending j), then -1 padding. ``tie_ids`` [T, c]:
    ties go to the lower tie_ids[t, j] instead (a re-rank layer's pool positions)."""
    if tie_ids is not None:
        return _in_pool_order(cand.long(), _chosen(logits.float(), tie_ids.long(), k), k)
    col = topk_rows_reference(logits, k).long()
    big = logits.shape[1]
    j = torch.where(col < 0, big, col).sort(1).values      # pool order, the padding last
    # a column past the pool (the padding) reads a -1 appended to each row
    padded = torch.nn.functional.pad(cand.long(), (0, 1), value=-1)
    return padded.gather(1, j).to(torch.int32)


def _chosen(vals: torch.Tensor, ids: torch.Tensor, k: int) -> torch.Tensor:
    """[R, c] bool: the k entries with the largest valid vals (NaN / -inf never; -0.0 ties +0.0), ties to the
    lower id."""
    vals = vals + 0.0
    vals = torch.where(torch.isnan(vals), float("-inf"), vals)
    # rank by (value desc, id asc): a stable sort by id, then a stable sort by value
    by_id = torch.sort(ids, dim=1, stable=True).indices
    order = by_id.gather(1, torch.sort(vals.gather(1, by_id), dim=1, descending=True, stable=True).indices)
    chosen = torch.zeros(vals.shape, dtype=torch.bool, device=vals.device)
    chosen.scatter_(1, order[:, :min(k, vals.shape[1])], True)
    return chosen & (vals != float("-inf"))


def _in_pool_order(cand: torch.Tensor, chosen: torch.Tensor, k: int) -> torch.Tensor:
    """[R, k] int32: cand's chosen entries in pool order, then -1 padding."""
    c = cand.shape[1]
    j = torch.where(chosen, torch.arange(c, device=cand.device), c).sort(1).values[:, :min(k, c)]
    out = torch.nn.functional.pad(cand, (0, 1), value=-1).gather(1, j).to(torch.int32)
    return torch.nn.functional.pad(out, (0, k - out.shape[1]), value=-1) if out.shape[1] < k else out
