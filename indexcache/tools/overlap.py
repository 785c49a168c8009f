"""Cross-layer top-k overlap: |T_i ∩ T_j| / |T_i| averaged over queries (the paper's Appendix A metric)."""
from __future__ import annotations

import torch


def row_overlap(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-query intersection size and selected count of index sets a, b [..., k] (int, -1 = empty slot).

    Both layers select min(k, visible tokens) tokens per query, so dividing by the count equals the
    paper's division by k wherever a query sees more than k tokens.
    """
    a_sorted = torch.where(a < 0, torch.iinfo(torch.int32).max, a.to(torch.int32)).sort(dim=-1).values
    pos = torch.searchsorted(a_sorted.contiguous(), b.to(torch.int32).contiguous()).clamp(max=a.shape[-1] - 1)
    hit = (a_sorted.gather(-1, pos) == b) & (b >= 0)
    return hit.sum(-1), (a >= 0).sum(-1)


def pairwise_overlap(topk: list[torch.Tensor], min_visible: int | None = None) -> torch.Tensor:
    """[L, L] mean overlap between every pair of layers' selections (each [B, T, k]).

    Queries that see at most ``min_visible`` tokens (default: k, where every token is selected and the
    overlap is trivially 1) are left out.
    """
    k = topk[0].shape[-1]
    min_visible = k if min_visible is None else min_visible
    counts = (topk[0] >= 0).sum(-1)
    keep = counts >= 1
    T = topk[0].shape[1]
    visible = torch.arange(1, T + 1, device=topk[0].device).expand_as(counts)
    keep &= visible > min_visible
    if not bool(keep.any()):
        keep = counts >= 1  # short inputs: fall back to every query, noted by the caller
    L = len(topk)
    out = torch.ones(L, L, dtype=torch.float64)
    for i in range(L):
        for j in range(i + 1, L):
            inter, n = row_overlap(topk[i], topk[j])
            frac = inter[keep].double() / n[keep].clamp(min=1).double()
            out[i, j] = out[j, i] = frac.mean()
    return out
