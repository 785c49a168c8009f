"""Rotary embedding with the pair layout as an explicit argument.

Interleaved pairs (2i, 2i+1) come out de-interleaved ([evens rotated | odds rotated], as in transformers); half-split
pairs (i, i+d/2) stay where they are. Each product and sum is one op in the inputs' dtype (a bf16 model rounds after
every one of them), which the kernel reproduces."""
from __future__ import annotations

import torch


def rope_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """Rotate the last dim of ``x`` ([..., rope_dim]); cos/sin broadcast against [..., rope_dim/2]."""
    if interleaved:
        x1, x2 = x[..., 0::2], x[..., 1::2]
    else:
        half = x.shape[-1] // 2
        x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
