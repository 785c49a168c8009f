"""The three collectives the sharded model needs; each is a no-op on one rank."""
from __future__ import annotations

import torch
import torch.distributed as dist

from .context import ParallelContext


def all_reduce_(t: torch.Tensor, ctx: ParallelContext) -> torch.Tensor:
    """Sum ``t`` over the ranks in place (row-parallel outputs, masked embedding lookups)."""
    if not ctx.is_single:
        dist.all_reduce(t, group=ctx.group)
    return t


def all_gather(t: torch.Tensor, ctx: ParallelContext) -> torch.Tensor:
    """[world, *t.shape]: every rank's ``t`` (same shape on every rank), rank order."""
    if ctx.is_single:
        return t[None]
    out = torch.empty((ctx.world_size * t.shape[0], *t.shape[1:]), dtype=t.dtype, device=t.device)
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, t.contiguous(), group=ctx.group)
    return out.view(ctx.world_size, *t.shape)


def broadcast_(t: torch.Tensor, ctx: ParallelContext, src: int = 0) -> torch.Tensor:
    if not ctx.is_single:
        dist.broadcast(t, src=src, group=ctx.group)
    return t
