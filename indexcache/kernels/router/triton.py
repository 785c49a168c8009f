"""The DeepSeek ``noaux_tc`` router in one Triton launch (see reference.py for what it computes).

Grid (token blocks, expert blocks, D splits). Program (t, e, s) multiplies its tokens' x [BLOCK_T, D range s] by
its experts' weight rows with fp32 accumulation and stores the fp32 partial logits in part [SPLITS, N, E]; then
it counts itself in on token block t's arrival counter. The last program of the block sums the splits' partials
in a fixed order (the same bits whichever program is last) and routes those tokens, SUB_T at a time: sigmoid,
correction bias, the group limit (ties between groups: the lower group), K selection rounds (ties: the lower
expert; one integer max per round over packed (order-preserving value key, expert) pairs), then the selected
experts' scores, normalisation and scaling. It resets the counter: no memset, no host sync, so the launch can
be captured in a CUDA graph.

Decode (N <= 16) splits D as well, so that many programs share the weight read (64 x 2048 bf16 is 256 KB: one
program reading it all is slow); prefill uses no splits and 64-token blocks.
The products: when x and the weight have the same 16-bit dtype, tl.dot on the tiles as they are (the products
of bf16 or fp16 values are exact in fp32; the tensor cores add them in fp32, though not with round-to-nearest
at every step: differences of the size that another summation order gives); otherwise, or with
``exact_products``, both are converted to fp32 and multiplied with input_precision="ieee" (CUDA-core FMAs).
Scores use a round-to-nearest division (Triton's plain fp32 ``/`` is approximate on the GPU), as does the
normalisation.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from indexcache.kernels.arrival import arrival_counters, arrive_last

DECODE_MAX_ROWS = 16  # tl.dot's smallest M; up to here the decode plan (D splits) runs
_EPILOGUE_ELEMS = 2048  # a routing step's [SUB_T, SPLITS, E] fp32 tile: 16 values per thread at 4 warps
_SPLIT_ELEMS = 1024  # splits x experts per token in that tile (caps the D splits for wide routers)


@triton.jit
def _ordered_key(v):
    """fp32 -> int64 whose signed order is the floats' (NaN above +inf, as torch.topk ranks it), in the high 32
    bits; -0 is made +0 first so that it ties with +0."""
    bits = tl.where(v == 0.0, 0.0, v).to(tl.int32, bitcast=True)
    return (bits ^ ((bits >> 31) & 0x7FFFFFFF)).to(tl.int64) << 32


@triton.jit
def _split_sum(part_ptr, r64, cols, mask, N, E, SPLITS: tl.constexpr, SPLITS_P: tl.constexpr):
    """The logits of rows r64 [SUB_T] at columns cols [SUB_T or 1, C]: the splits' partials summed in a fixed
    order. .cg: other SMs wrote them; read them from L2, not a stale L1."""
    if SPLITS == 1:
        return tl.load(part_ptr + r64[:, None] * E + cols, mask=mask, other=0.0, cache_modifier=".cg")
    ss = tl.arange(0, SPLITS_P)[None, :, None]
    p = part_ptr + ss.to(tl.int64) * N * E + r64[:, None, None] * E + cols[:, None, :]
    return tl.sum(tl.load(p, mask=mask[:, None, :] & (ss < SPLITS), other=0.0, cache_modifier=".cg"), axis=1)


@triton.jit
def _route_rows(part_ptr, b_ptr, ids_ptr, wts_ptr, r, rmask, N, E, scale,
                SPLITS: tl.constexpr, SPLITS_P: tl.constexpr, EP: tl.constexpr, K: tl.constexpr,
                KP: tl.constexpr, N_GROUP: tl.constexpr, TOPK_GROUP: tl.constexpr, NORM: tl.constexpr,
                SUB_T: tl.constexpr):
    """Route tokens r [SUB_T] (rmask: real rows) from their partial logits. Each selection round is one max over
    packed (value key, EP - 1 - expert) integers: the best value, and among exact ties the lowest expert."""
    ex = tl.arange(0, EP)
    emask = ex < E
    r64 = r.to(tl.int64)
    logit = _split_sum(part_ptr, r64, ex[None, :], rmask[:, None] & emask[None, :], N, E, SPLITS, SPLITS_P)
    scores = tl.math.div_rn(tl.full([SUB_T, EP], 1.0, tl.float32), 1.0 + tl.exp(-logit))
    choice = scores + tl.load(b_ptr + ex, mask=emask, other=0.0).to(tl.float32)[None, :]
    low = (EP - 1 - ex)[None, :].to(tl.int64)
    if N_GROUP > 1:  # EP == E here (checked by the launcher)
        GS: tl.constexpr = EP // N_GROUP
        c3 = tl.reshape(choice, [SUB_T, N_GROUP, GS])
        p3 = tl.reshape(_ordered_key(choice) | low, [SUB_T, N_GROUP, GS])
        first = tl.max(p3, axis=2)  # each group's best (its lowest expert among ties)
        m1 = tl.max(c3, axis=2)
        m2 = tl.max(tl.where(p3 == first[:, :, None], float("-inf"), c3), axis=2)
        gsc = m1 + m2  # [SUB_T, N_GROUP]: the sum of the group's two best
        g = tl.arange(0, N_GROUP)
        a = gsc[:, :, None]
        b = gsc[:, None, :]
        ahead = (b > a) | ((b == a) & (g[None, None, :] < g[None, :, None]))  # group h ranks before group g
        keep = tl.sum(ahead.to(tl.int32), axis=2) < TOPK_GROUP
        choice = tl.reshape(tl.where(keep[:, :, None], c3, float("-inf")), [SUB_T, EP])
    packed = tl.where(emask[None, :], _ordered_key(choice) | low, -9223372036854775807 - 1)
    kk = tl.arange(0, KP)[None, :]
    sel = tl.zeros([SUB_T, KP], tl.int32)
    for k in tl.static_range(K):
        best = tl.max(packed, axis=1)
        idx = (EP - 1) - (best & 0xFFFFFFFF).to(tl.int32)
        packed = tl.where(ex[None, :] == idx[:, None], -9223372036854775807 - 1, packed)
        sel = tl.where(kk == k, idx[:, None], sel)
    om = rmask[:, None] & (kk < K)
    sel_logit = _split_sum(part_ptr, r64, sel, om, N, E, SPLITS, SPLITS_P)
    sel_w = tl.where(om, tl.math.div_rn(tl.full([SUB_T, KP], 1.0, tl.float32), 1.0 + tl.exp(-sel_logit)), 0.0)
    if NORM:
        tot = tl.sum(sel_w, axis=1) + 1e-20
        sel_w = tl.math.div_rn(sel_w, tl.broadcast_to(tot[:, None], [SUB_T, KP]))
    sel_w = sel_w * scale
    tl.store(ids_ptr + r64[:, None] * K + kk, sel.to(tl.int64), mask=om)
    tl.store(wts_ptr + r64[:, None] * K + kk, sel_w, mask=om)


@triton.jit(do_not_specialize=["N"])  # the token count varies per batch: one compile per plan
def _router_kernel(x_ptr, w_ptr, b_ptr, part_ptr, cnt_ptr, ids_ptr, wts_ptr, N, D, E, D_PER_SPLIT,
                   stride_xn, stride_xd, stride_we, stride_wd, scale,
                   BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_D: tl.constexpr, SPLITS: tl.constexpr,
                   SPLITS_P: tl.constexpr, EP: tl.constexpr, K: tl.constexpr, KP: tl.constexpr,
                   N_GROUP: tl.constexpr, TOPK_GROUP: tl.constexpr, NORM: tl.constexpr, SUB_T: tl.constexpr,
                   NATIVE_DOT: tl.constexpr):
    tb = tl.program_id(0)
    split = tl.program_id(2)
    rows = tb * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.program_id(1) * BLOCK_E + tl.arange(0, BLOCK_E)
    rmask = rows < N
    cmask = cols < E
    rows64 = rows.to(tl.int64)
    cols64 = cols.to(tl.int64)
    d_lo = split * D_PER_SPLIT
    d_hi = tl.minimum(d_lo + D_PER_SPLIT, D)
    acc = tl.zeros([BLOCK_T, BLOCK_E], tl.float32)
    for d0 in range(d_lo, d_hi, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        dm = dd < d_hi
        xt = tl.load(x_ptr + rows64[:, None] * stride_xn + dd[None, :] * stride_xd,
                     mask=rmask[:, None] & dm[None, :], other=0.0)
        wt = tl.load(w_ptr + cols64[None, :] * stride_we + dd[:, None] * stride_wd,
                     mask=cmask[None, :] & dm[:, None], other=0.0)
        if NATIVE_DOT:
            acc = tl.dot(xt, wt, acc)
        else:
            acc = tl.dot(xt.to(tl.float32), wt.to(tl.float32), acc, input_precision="ieee")
    tl.store(part_ptr + split.to(tl.int64) * N * E + rows64[:, None] * E + cols[None, :], acc,
             mask=rmask[:, None] & cmask[None, :])
    if arrive_last(cnt_ptr + tb, tl.num_programs(1) * tl.num_programs(2)):  # the token block's last program
        t_hi = tl.minimum(tb * BLOCK_T + BLOCK_T, N)
        for t0 in range(tb * BLOCK_T, t_hi, SUB_T):
            r = t0 + tl.arange(0, SUB_T)
            _route_rows(part_ptr, b_ptr, ids_ptr, wts_ptr, r, r < t_hi, N, E, scale, SPLITS, SPLITS_P, EP, K, KP,
                        N_GROUP, TOPK_GROUP, NORM, SUB_T)


def _programs_wanted(device: torch.device) -> int:
    """About one program per SM in decode; the CPU interpreter gets a few, so tests exercise the D splits."""
    if device.type != "cuda":
        return 8
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


@torch.compiler.assume_constant_result
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def router_plan(n: int, e: int, d: int, programs: int) -> dict:
    """Block sizes (tl.dot wants >= 16 in every dimension) and D splits for n tokens of a router with e experts
    of width d, aiming at ``programs`` programs in decode (``_programs_wanted``)."""
    ep = triton.next_power_of_2(e)
    block_d = 64
    if n <= DECODE_MAX_ROWS:
        block_t, block_e = 16, 16
        dblocks = triton.cdiv(d, block_d)
        want = triton.cdiv(programs, triton.cdiv(e, block_e))
        splits = max(1, min(dblocks, _SPLIT_ELEMS // ep, want))
    else:
        block_t, block_e, splits = 64, min(max(ep, 16), 64), 1
    return dict(block_t=block_t, block_e=block_e, block_d=block_d, splits=splits)


def router_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, top_k: int, n_group: int,
                  topk_group: int, norm: bool, scale: float, *, block_t: int | None = None,
                  block_e: int | None = None, block_d: int | None = None, splits: int | None = None,
                  num_warps: int = 4, exact_products: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs checked by the caller (reference.check_router_inputs); with n_group > 1 the group size and
    n_group are powers of two. Block sizes (powers of two, block_t and block_d >= 16) and ``splits`` (D splits)
    default to ``router_plan``'s. ``exact_products``: fp32 FMAs even for 16-bit x and weight of one dtype (see
    the module text; benchmarks/router.py measures both)."""
    n, d = x.shape
    e = weight.shape[0]
    ep = triton.next_power_of_2(e)
    if n_group > 1 and (ep != e or n_group & (n_group - 1)):
        raise ValueError(f"router: the kernel groups experts by reshaping; needs powers of two, got {e} experts "
                         f"in {n_group} groups")
    ids = torch.empty(n, top_k, dtype=torch.int64, device=x.device)
    wts = torch.empty(n, top_k, dtype=torch.float32, device=x.device)
    if n == 0:
        return ids, wts
    plan = router_plan(n, e, d, _programs_wanted(x.device))
    block_t = block_t or plan["block_t"]
    block_e = block_e or plan["block_e"]
    block_d = block_d or plan["block_d"]
    splits = splits or plan["splits"]
    dblocks = max(1, triton.cdiv(d, block_d))
    per = triton.cdiv(dblocks, min(splits, dblocks))
    splits = triton.cdiv(dblocks, per)  # no empty split
    splits_p = triton.next_power_of_2(splits)
    sub_t = max(1, min(block_t, _EPILOGUE_ELEMS // (splits_p * ep)))
    part = torch.empty(splits, n, e, dtype=torch.float32, device=x.device)
    tblocks = triton.cdiv(n, block_t)
    cnt = arrival_counters(x.device, tblocks)
    native = not exact_products and x.dtype == weight.dtype and x.dtype in (torch.float16, torch.bfloat16)
    grid = (tblocks, triton.cdiv(e, block_e), splits)
    _router_kernel[grid](x, weight, bias, part, cnt, ids, wts, n, d, e, per * block_d,
                         x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), float(scale),
                         BLOCK_T=block_t, BLOCK_E=block_e, BLOCK_D=block_d, SPLITS=splits, SPLITS_P=splits_p, EP=ep,
                         K=top_k, KP=triton.next_power_of_2(top_k), N_GROUP=n_group, TOPK_GROUP=topk_group,
                         NORM=bool(norm), SUB_T=sub_t, NATIVE_DOT=native, num_warps=num_warps)
    return ids, wts
