"""``to_slots``: logical key positions [T,k] -> global slot ids of the paged caches, through each row's block table.
Triton on CUDA tensors (or on CPU under TRITON_INTERPRET=1), the PyTorch reference otherwise."""
from __future__ import annotations

import torch

from indexcache.kernels._dispatch import use_triton
from indexcache.kernels.slots.reference import to_slots_reference

_INT = (torch.int32, torch.int64)


def to_slots(logical: torch.Tensor, table: torch.Tensor, page: int) -> torch.Tensor:
    """int32 [T,k]: table[t, p // page] * page + p % page for each position p = logical[t, j] >= 0, -1 where p < 0.
    ``table`` [T, max_blocks] int32/int64 page ids (a row broadcast with stride 0 is fine); positions must lie
    inside the table's blocks (not checked here: that would read the device on every call). Slot ids stay below
    2^31 (the cache would need 2^31 tokens)."""
    if logical.dim() != 2 or logical.dtype not in _INT:
        raise ValueError(f"to_slots: logical must be [T,k] int32/int64, got {tuple(logical.shape)} {logical.dtype}")
    if table.dim() != 2 or table.shape[0] != logical.shape[0] or table.dtype not in _INT:
        raise ValueError(f"to_slots: table must be [T={logical.shape[0]}, blocks] int32/int64, got "
                         f"{tuple(table.shape)} {table.dtype}")
    if table.device != logical.device:
        raise ValueError(f"to_slots: table is on {table.device}, logical on {logical.device}")
    if isinstance(page, bool) or not isinstance(page, int) or page < 1:
        raise ValueError(f"to_slots: page must be a positive int, got {page!r}")
    if use_triton(logical):
        from indexcache.kernels.slots.triton import to_slots_triton

        return to_slots_triton(logical, table, page)
    return to_slots_reference(logical, table, page)
