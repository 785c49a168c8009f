"""PyTorch reference of the MoE routing plan: the expert-sorted order of a batch's (token, slot) pairs and the
tile map of the grouped GEMMs that run over them.

For ids [N, K] (expert of each token's K slots) and weights [N, K], the M = N*K pairs p = token*K + slot sorted
stably by expert give, per sorted row r:
- pair[r]   = p (where the down projection stores the row: (token, slot) order),
- token[r]  = p // K (the activation row it reads),
- weight[r] = weights[token, slot] (fp32);
and per expert e: counts[e] rows, expert_end[e] = the end of its rows. For each block size B the rows are cut
into tiles of B rows that never straddle two experts: tile t belongs to expert tile_expert[t] (E for spare
tiles: the tile count is data-dependent, so there are cdiv(M, B) + E slots, an upper bound) and starts at
tile_row[t]. This is what every grouped GEMM launch of the layer reads, computed once on the device, no sync.
"""
from __future__ import annotations

from typing import NamedTuple

import torch


class ExpertPlan(NamedTuple):
    counts: torch.Tensor       # [E] int32
    pair: torch.Tensor         # [M] int32
    token: torch.Tensor        # [M] int32
    weight: torch.Tensor       # [M] fp32
    expert_end: torch.Tensor   # [E] int32
    tiles: dict                # block size -> (tile_expert [cdiv(M, B) + E] int32, tile_row [same] int32)


def check_plan_inputs(name, ids, weights, num_experts, block_sizes):
    if ids.dim() != 2 or ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{name}: ids must be int32/int64 [N, K], got {tuple(ids.shape)} {ids.dtype}")
    if weights.shape != ids.shape or not weights.is_floating_point():
        raise ValueError(f"{name}: weights must be a float tensor of ids' shape {tuple(ids.shape)}, got "
                         f"{tuple(weights.shape)} {weights.dtype}")
    if weights.device != ids.device:
        raise ValueError(f"{name}: weights on {weights.device}, ids on {ids.device}")
    if num_experts < 1:
        raise ValueError(f"{name}: num_experts must be >= 1, got {num_experts}")
    for b in block_sizes:
        if b < 1:
            raise ValueError(f"{name}: block sizes must be >= 1, got {b}")


def tile_map_reference(counts: torch.Tensor, m: int, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    E = counts.shape[0]
    c = counts.to(torch.int64)
    starts = c.cumsum(0) - c
    tiles = (c + block - 1) // block
    tile_end = tiles.cumsum(0)
    t = torch.arange(-(-m // block) + E, device=counts.device)
    te = torch.searchsorted(tile_end, t, right=True)              # E for tiles past the last expert's
    te_c = te.clamp(max=E - 1)
    row = starts[te_c] + (t - (tile_end[te_c] - tiles[te_c])) * block
    return te.to(torch.int32), torch.where(te < E, row, 0).to(torch.int32)


def expert_plan_reference(ids, weights, num_experts, block_sizes=(64,)):
    check_plan_inputs("expert_plan_reference", ids, weights, num_experts, block_sizes)
    K = ids.shape[1]
    flat = ids.flatten().long()
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= num_experts):
        raise ValueError(f"expert_plan_reference: expert ids must be in [0, {num_experts}), got "
                         f"[{int(flat.min())}, {int(flat.max())}]")
    order = flat.argsort(stable=True)
    counts = torch.bincount(flat, minlength=num_experts).to(torch.int32)
    m = flat.numel()
    return ExpertPlan(counts, order.to(torch.int32), (order // K).to(torch.int32), weights.flatten().float()[order],
                      counts.cumsum(0).to(torch.int32), {b: tile_map_reference(counts, m, b) for b in block_sizes})
