"""The MoE routing plan in one Triton launch (see reference.py for what it computes).

Two launches over at most 128 spans of the M pairs: the first counts each expert's pairs per span; the second
gives every pair its sorted position, starts[e] + expert e's pairs in earlier spans + those earlier in its own
chunk (a cumsum of the chunk's one-hot [chunk, experts] matrix), which is the stable order, and writes a share of
the tile maps. torch ops took ~0.2 ms for the sort and counts and ~15 small launches per grouped GEMM for its tile
map (H200, 8K tokens x top-4 over 64 experts); here it is two launches, no host sync. Expert ids must lie in
[0, num_experts) (not checked on the GPU: that would need a sync; the router's top-k guarantees it).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from indexcache.kernels.expert_plan.reference import ExpertPlan

_TILE_CHUNK = 128


@triton.jit
def _tile_map(counts, starts, te_ptr, tr_ptr, t_lo, t_hi, E, EP: tl.constexpr, B: tl.constexpr, TCH: tl.constexpr):
    """Tiles [t_lo, t_hi) of the map for block size B."""
    ex = tl.arange(0, EP)
    ntile = (counts + B - 1) // B
    tile_end = tl.cumsum(ntile, axis=0)
    tile_start = tile_end - ntile
    live = ex < E
    for t0 in range(t_lo, t_hi, TCH):
        t = t0 + tl.arange(0, TCH)
        te = tl.sum(((tile_end[None, :] <= t[:, None]) & live[None, :]).to(tl.int32), axis=1)  # searchsorted right
        sel = (ex[None, :] == te[:, None]) & live[None, :]
        row = tl.sum(tl.where(sel, starts[None, :] + (t[:, None] - tile_start[None, :]) * B, 0), axis=1)
        tl.store(te_ptr + t, te, mask=t < t_hi)
        tl.store(tr_ptr + t, row, mask=t < t_hi)


@triton.jit(do_not_specialize=["M", "SPAN"])  # sizes vary per chunk: one compile
def _plan_hist_kernel(ids_ptr, hist_ptr, M, SPAN, EP: tl.constexpr, CHUNK: tl.constexpr):
    """hist[g, e] = pairs of expert e among pairs [g*SPAN, (g+1)*SPAN)."""
    g = tl.program_id(0)
    ex = tl.arange(0, EP)
    counts = tl.zeros([EP], tl.int32)
    for c0 in range(g * SPAN, tl.minimum(g * SPAN + SPAN, M), CHUNK):
        i = c0 + tl.arange(0, CHUNK)
        e = tl.load(ids_ptr + i, mask=(i < M) & (i < g * SPAN + SPAN), other=-1).to(tl.int32)  # -1: no expert
        counts += tl.sum((e[:, None] == ex[None, :]).to(tl.int32), axis=0)
    tl.store(hist_ptr + g * EP + ex, counts)


@triton.jit(do_not_specialize=["M", "T1", "T2", "SPAN", "G"])
def _plan_scatter_kernel(ids_ptr, w_ptr, hist_ptr, counts_ptr, pair_ptr, token_ptr, weight_ptr, end_ptr,
                         te1_ptr, tr1_ptr, te2_ptr, tr2_ptr, M, K, E, T1, T2, SPAN, G,
                         EP: tl.constexpr, CHUNK: tl.constexpr, B1: tl.constexpr, B2: tl.constexpr,
                         TWO: tl.constexpr, TCH: tl.constexpr):
    """Span g: its pairs' sorted positions are starts[e] + expert e's pairs in earlier spans + those earlier in
    its own span (the stable order); span g also writes its share of the tile maps, span 0 the counts."""
    g = tl.program_id(0)
    ex = tl.arange(0, EP)
    counts = tl.zeros([EP], tl.int32)
    run = tl.zeros([EP], tl.int32)
    for j in range(0, G):
        h = tl.load(hist_ptr + j * EP + ex)
        counts += h
        run += tl.where(j < g, h, 0)
    ends = tl.cumsum(counts, axis=0)
    starts = ends - counts
    run += starts
    if g == 0:
        tl.store(counts_ptr + ex, counts, mask=ex < E)
        tl.store(end_ptr + ex, ends, mask=ex < E)
    for c0 in range(g * SPAN, tl.minimum(g * SPAN + SPAN, M), CHUNK):
        i = c0 + tl.arange(0, CHUNK)
        im = (i < M) & (i < g * SPAN + SPAN)
        e = tl.load(ids_ptr + i, mask=im, other=-1).to(tl.int32)
        oh = (e[:, None] == ex[None, :]).to(tl.int32)
        dest = tl.sum((tl.cumsum(oh, axis=0) - oh + run[None, :]) * oh, axis=1)
        run += tl.sum(oh, axis=0)
        tl.store(pair_ptr + dest, i, mask=im)
        tl.store(token_ptr + dest, i // K, mask=im)
        tl.store(weight_ptr + dest, tl.load(w_ptr + i, mask=im, other=0.0).to(tl.float32), mask=im)
    per1 = tl.cdiv(T1, G)
    _tile_map(counts, starts, te1_ptr, tr1_ptr, g * per1, tl.minimum(g * per1 + per1, T1), E, EP, B1, TCH)
    if TWO:
        per2 = tl.cdiv(T2, G)
        _tile_map(counts, starts, te2_ptr, tr2_ptr, g * per2, tl.minimum(g * per2 + per2, T2), E, EP, B2, TCH)


_MAX_SPANS = 128  # programs; each reads all spans' histograms (G x experts ints)


def expert_plan_triton(ids: torch.Tensor, weights: torch.Tensor, num_experts: int, block_sizes) -> ExpertPlan:
    """Inputs checked by the caller; ids [N, K] int, weights [N, K] float, one or two block sizes."""
    N, K = ids.shape
    M, E, dev = N * K, num_experts, ids.device
    blocks = list(dict.fromkeys(int(b) for b in block_sizes))
    if not 1 <= len(blocks) <= 2:
        raise ValueError(f"expert_plan: one or two block sizes, got {block_sizes}")
    i32 = dict(dtype=torch.int32, device=dev)
    counts, ends = torch.empty(E, **i32), torch.empty(E, **i32)
    pair, token = torch.empty(M, **i32), torch.empty(M, **i32)
    weight = torch.empty(M, dtype=torch.float32, device=dev)
    maps = {b: (torch.empty(triton.cdiv(M, b) + E, **i32), torch.empty(triton.cdiv(M, b) + E, **i32)) for b in blocks}
    (te1, tr1), (te2, tr2) = maps[blocks[0]], maps[blocks[-1]]
    ep = triton.next_power_of_2(E)
    chunk = max(16, min(512, 32768 // ep))  # the one-hot chunk holds at most 32K entries (no register spills)
    span = chunk * triton.cdiv(triton.cdiv(M, chunk), _MAX_SPANS)
    grid = triton.cdiv(M, span)
    ids, weights = ids.contiguous(), weights.contiguous()
    hist = torch.empty(grid, ep, **i32)
    _plan_hist_kernel[(grid,)](ids, hist, M, span, EP=ep, CHUNK=chunk, num_warps=8)
    _plan_scatter_kernel[(grid,)](ids, weights, hist, counts, pair, token, weight, ends, te1, tr1, te2, tr2,
                                  M, K, E, te1.shape[0], te2.shape[0], span, grid,
                                  EP=ep, CHUNK=chunk, B1=blocks[0], B2=blocks[-1], TWO=len(blocks) == 2,
                                  TCH=_TILE_CHUNK, num_warps=8)
    return ExpertPlan(counts, pair, token, weight, ends, maps)
