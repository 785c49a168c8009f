"""PyTorch reference of the DeepSeek ``noaux_tc`` MoE router, and the input checks.

For tokens x [N, D] and router weight W [E, D] (maths in fp32):
    scores = sigmoid(x W^T)                                   [N, E]
    choice = scores + bias                                    (bias [E]: e_score_correction_bias; selection only)
    n_group > 1: the experts form n_group groups of E / n_group; a group's score is the sum of its two largest
                 choice values; the topk_group best groups are kept, the others' choice values become -inf
    ids     = top_k(choice)                                   [N, K]
    weights = scores[ids], divided by their sum (+1e-20) when ``norm``, times ``scale``   [N, K] fp32
The order of a token's K ids is not part of the contract (torch.topk's unsorted order here; descending choice in
the Triton kernel); nor is which of exactly tied experts or groups is taken.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def check_router_inputs(name, x, weight, bias, top_k, n_group, topk_group):
    """Shapes, dtypes, devices and the routing numbers (host metadata only)."""
    if x.dim() != 2 or x.dtype not in _FLOATS:
        raise ValueError(f"{name}: x must be float32/float16/bfloat16 [N, D], got {tuple(x.shape)} {x.dtype}")
    if weight.dim() != 2 or weight.shape[1] != x.shape[1] or weight.dtype not in _FLOATS:
        raise ValueError(f"{name}: weight must be float32/float16/bfloat16 [E, D={x.shape[1]}], got "
                         f"{tuple(weight.shape)} {weight.dtype}")
    E = weight.shape[0]
    if bias.shape != (E,) or not bias.is_floating_point():
        raise ValueError(f"{name}: bias must be a float tensor [E={E}], got {tuple(bias.shape)} {bias.dtype}")
    if weight.device != x.device or bias.device != x.device:
        raise ValueError(f"{name}: x on {x.device}, weight on {weight.device}, bias on {bias.device}")
    if n_group < 1 or E % n_group:
        raise ValueError(f"{name}: n_group must divide the {E} experts, got {n_group}")
    if n_group > 1 and E // n_group < 2:
        raise ValueError(f"{name}: a group's score sums its two best experts: groups of {E // n_group} expert(s)")
    if not 1 <= topk_group <= n_group:
        raise ValueError(f"{name}: topk_group must be in [1, n_group={n_group}], got {topk_group}")
    if not 1 <= top_k <= topk_group * (E // n_group):
        raise ValueError(f"{name}: top_k must be in [1, {topk_group * (E // n_group)}] (the experts of the "
                         f"{topk_group} kept group(s)), got {top_k}")


def router_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, top_k: int, *, n_group: int = 1,
                     topk_group: int = 1, norm: bool = True, scale: float = 1.0
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """x [N, D], weight [E, D], bias [E] -> (ids [N, top_k] int64, weights [N, top_k] fp32); see the module text."""
    check_router_inputs("router_reference", x, weight, bias, top_k, n_group, topk_group)
    E = weight.shape[0]
    scores = F.linear(x.float(), weight.float()).sigmoid()
    choice = scores + bias.float()
    if n_group > 1:
        grouped = choice.view(-1, n_group, E // n_group)
        group_scores = grouped.topk(2, dim=-1).values.sum(-1)
        keep = torch.zeros_like(group_scores, dtype=torch.bool)
        keep.scatter_(1, group_scores.topk(topk_group, dim=-1, sorted=False).indices, True)
        choice = choice.masked_fill(~keep.repeat_interleave(E // n_group, dim=1), float("-inf"))
    ids = choice.topk(top_k, dim=-1, sorted=False).indices
    weights = scores.gather(1, ids)
    if norm:
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
    return ids, weights * scale
