"""Plain PyTorch exact top-k per row, the oracle for the Triton kernel.

Tie rule (shared with the kernel): among equal values, the lower column index wins, so the selected set is
unique. -0.0 and +0.0 are equal values. NaN, -inf and columns outside [row_start, row_end) are never selected.
"""
from __future__ import annotations

import torch


def topk_rows_reference(logits: torch.Tensor, k: int, *, row_start: torch.Tensor | None = None,
                        row_end: torch.Tensor | None = None) -> torch.Tensor:
    """int32 [R, k]: column ids of the k largest valid values per row, sorted by (value desc, column asc);
    -1 pads rows with fewer than k valid entries."""
    R, N = logits.shape
    x = logits.float()
    cols = torch.arange(N, device=x.device)
    valid = ~torch.isnan(x) & (x != float("-inf"))
    if row_start is not None:
        valid &= cols[None, :] >= row_start.to(x.device).long()[:, None]
    if row_end is not None:
        valid &= cols[None, :] < row_end.to(x.device).long()[:, None]
    xv = torch.where(valid, x + 0.0, torch.full_like(x, float("-inf")))
    # stable descending sort keeps the original (ascending) column order among equal values
    vals, idx = torch.sort(xv, dim=1, descending=True, stable=True)
    kk = min(k, N)
    idx = torch.where(vals[:, :kk] == float("-inf"), torch.full_like(idx[:, :kk], -1), idx[:, :kk])
    out = torch.full((R, k), -1, dtype=torch.int32, device=x.device)
    out[:, :kk] = idx.to(torch.int32)
    return out
