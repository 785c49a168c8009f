"""Plain PyTorch reference of ``to_slots``: each entry's page through its row's block table."""
from __future__ import annotations

import torch


def to_slots_reference(logical: torch.Tensor, table: torch.Tensor, page: int) -> torch.Tensor:
    """logical [T,k] key positions (-1 = none), table [T, max_blocks] page ids -> int32 [T,k] slot ids
    table[t, p // page] * page + p % page (-1 where logical is negative)."""
    lg = logical.to(torch.int32)
    blk = table.gather(1, (lg.clamp(min=0) // page).long()).to(torch.int32)
    return torch.where(lg < 0, -1, blk * page + lg % page)
