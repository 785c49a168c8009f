"""Training through a shard (``distill -tp N``): the gradient step and the gathered result.

Every rank computes the same loss L (the logits are gathered whole on every rank). The sharded model's collectives
are differentiable with a summing backward (comm.py), so each rank's backward computes the gradient of the *sum* of
the N ranks' losses, N·L, as seen by its own copy of every parameter: a sharded parameter's gradient is N times its
slice of dL/dθ; a replicated parameter holds only the part of N·dL/dθ that flowed through this rank's shards (plus
its replicated paths). So: sum the replicated gradients over the ranks, divide all by N — exactly the one-process
gradient, with no extra collective in the forward. Adam is elementwise, so each rank then steps its slices alone;
only the clipping norm needs the ranks' sums of squares.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from .comm import all_gather, all_reduce_
from .context import ParallelContext
from .plan import Shard, param_shard


def _names(model: nn.Module) -> dict[int, str]:
    return {id(p): n for n, p in model.named_parameters()}


def reduce_gradients(model, params: list[torch.Tensor]) -> None:
    """Turn each rank's gradients of N·L into the gradients of L (see the module doc); no-op on one rank."""
    ctx: ParallelContext | None = getattr(model, "parallel", None)
    if ctx is None or ctx.is_single:
        return
    names, cfg = _names(model), model.config
    grads = [p.grad for p in params if p.grad is not None]
    replicated = [p.grad for p in params if p.grad is not None and param_shard(names[id(p)], cfg, ctx) is None]
    if replicated:  # one all-reduce for all of them
        flat = torch.cat([g.reshape(-1) for g in replicated])
        all_reduce_(flat, ctx)
        for g, part in zip(replicated, flat.split([g.numel() for g in replicated])):
            g.copy_(part.view_as(g))
    for g in grads:
        g.div_(ctx.world_size)


def clip_grad_norm_(model, params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` over the whole (unsharded) parameters: the sharded slices' squares are
    summed over the ranks, the replicated ones counted once."""
    ctx: ParallelContext | None = getattr(model, "parallel", None)
    if ctx is None or ctx.is_single:
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    names, cfg = _names(model), model.config
    with_grad = [p for p in params if p.grad is not None]
    sq = [torch.zeros((), dtype=torch.float64), torch.zeros((), dtype=torch.float64)]  # sharded, replicated
    for p in with_grad:
        sq[param_shard(names[id(p)], cfg, ctx) is None] += p.grad.detach().double().pow(2).sum().cpu()
    sharded = all_reduce_(sq[0].to(ctx.device), ctx).cpu()
    norm = (sharded + sq[1]).sqrt().float()
    coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    for p in with_grad:
        p.grad.detach().mul_(coef.to(p.grad.device))
    return norm


def gather_full_state(model) -> dict[str, torch.Tensor] | None:
    """Every parameter and buffer (but the rotary tables) whole (DSAModel names, CPU), on rank 0; None on the other
    ranks. Sharded parameters are all-gathered (padded to the largest slice) and put back at their ranges; buffers
    (the routers' score biases) are replicated."""
    ctx: ParallelContext | None = getattr(model, "parallel", None)
    cfg = model.config
    out = {}
    for name, p in model.named_parameters():
        t = p.detach()
        mine = param_shard(name, cfg, ctx) if ctx is not None else None
        if mine is None:
            out[name] = t.cpu().clone()
            continue
        shards = [param_shard(name, cfg, ParallelContext(r, ctx.world_size, ctx.group, ctx.expert_parallel,
                                                         ctx.device)) for r in range(ctx.world_size)]
        width = max(s.size for s in shards)
        pad = [0, 0] * (t.dim() - 1 - mine.dim) + [0, width - t.shape[mine.dim]]
        every = all_gather(torch.nn.functional.pad(t, pad), ctx).cpu()
        out[name] = _assemble(every, shards, t)
    for name, b in model.named_buffers():
        if not name.startswith("rotary."):
            out[name] = b.detach().cpu().clone()
    return out if ctx is None or ctx.rank == 0 else None


def _assemble(every: torch.Tensor, shards: list[Shard], local: torch.Tensor) -> torch.Tensor:
    dim = shards[0].dim
    shape = list(local.shape)
    shape[dim] = max(b for s in shards for _, b in s.ranges)
    full = torch.empty(shape, dtype=local.dtype)
    for r, s in enumerate(shards):
        at = 0
        for a, b in s.ranges:
            full.narrow(dim, a, b - a).copy_(every[r].narrow(dim, at, b - a))
            at += b - a
    return full


def any_rank(flag: bool, ctx: ParallelContext | None) -> bool:
    """True when ``flag`` is true on any rank (decisions such as a time budget running out must be taken alike)."""
    if ctx is None or ctx.is_single:
        return flag
    t = torch.tensor([int(flag)], device=ctx.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=ctx.group)
    return bool(t.item())


def barrier(ctx: ParallelContext | None) -> None:
    if ctx is not None and not ctx.is_single:
        dist.barrier(group=ctx.group)
