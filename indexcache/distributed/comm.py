"""The three collectives the sharded model needs; each is a no-op on one rank.

When autograd records (training through a shard: ``distill -tp N``), the sum and the gather are torch's
differentiable ones, whose backward sums the ranks' gradients (the adjoint of a sum over ranks); see
``distributed.training`` for how the optimizer step turns that into the one-process gradient."""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn

from .context import ParallelContext


def all_reduce_(t: torch.Tensor, ctx: ParallelContext) -> torch.Tensor:
    """Sum ``t`` over the ranks, in place unless autograd records (then a new tensor): use the result."""
    if ctx.is_single:
        return t
    if _records(t):
        return dist_nn.all_reduce(t, group=ctx.group or dist.group.WORLD)
    dist.all_reduce(t, group=ctx.group)
    return t


def all_gather(t: torch.Tensor, ctx: ParallelContext) -> torch.Tensor:
    """[world, *t.shape]: every rank's ``t`` (same shape on every rank), rank order."""
    if ctx.is_single:
        return t[None]
    if _records(t):
        return torch.stack(dist_nn.all_gather(t.contiguous(), group=ctx.group or dist.group.WORLD))
    out = torch.empty((ctx.world_size * t.shape[0], *t.shape[1:]), dtype=t.dtype, device=t.device)
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, t.contiguous(), group=ctx.group)
    return out.view(ctx.world_size, *t.shape)


def _records(t: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and t.requires_grad


def broadcast_(t: torch.Tensor, ctx: ParallelContext, src: int = 0) -> torch.Tensor:
    if not ctx.is_single:
        dist.broadcast(t, src=src, group=ctx.group)
    return t


def strided_rows(n: int, ctx: ParallelContext, device=None) -> torch.Tensor:
    """This rank's rows r, r+N, r+2N, ... of ``n`` (causal work stays balanced across ranks), padded to
    ceil(n/N) rows by repeating the last row (``gather_strided`` drops the padding)."""
    per = -(-n // ctx.world_size)
    return (ctx.rank + ctx.world_size * torch.arange(per, device=device)).clamp(max=n - 1)


def gather_strided(local: torch.Tensor, n: int, ctx: ParallelContext) -> torch.Tensor:
    """Every rank's ``local`` [ceil(n/N), ...] (its ``strided_rows``) back into the ``n`` rows in order."""
    every = all_gather(local, ctx)  # [N, per, ...]: row j*N + r is every[r, j]
    return every.transpose(0, 1).reshape(-1, *local.shape[1:])[:n]


def min_over_ranks(value: int, ctx: ParallelContext, device=None) -> int:
    """The smallest ``value`` of all ranks (sizes every rank must agree on, such as the KV cache's pages)."""
    if ctx.is_single:
        return value
    t = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=ctx.group)
    return int(t.item())
