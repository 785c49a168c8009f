"""Triton kernel for re-rank scoring: logits of per-query candidate pools over the paged FP8 indexer-key cache.

One program owns one query row and BC candidates: it loads the candidates' slot ids, gathers their e4m3 keys and
fp32 scales from the 132-B/token paged layout (``kernels.formats``), and computes
    acc[BC, HP] = k_fp8 @ q_fp8^T  ->  relu -> * w -> sum over heads -> * k_scale
(-inf where the slot id is -1). The top-k of the row is then taken by ``kernels.topk``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from indexcache.kernels import formats as F
from indexcache.kernels._dispatch import interpreting

_PAGE: tl.constexpr = tl.constexpr(F.PAGE)
_PAGE_BYTES: tl.constexpr = tl.constexpr(F.INDEX_PAGE_BYTES)
_SCALES_AT: tl.constexpr = tl.constexpr(F.INDEX_SCALES_AT)
_D: tl.constexpr = tl.constexpr(F.INDEX_DIM)


@triton.jit(do_not_specialize=["C"])
def _candidate_logits_kernel(q_ptr, w_ptr, kc8_ptr, kcs_ptr, cand_ptr, out_ptr, C,
                             H: tl.constexpr, HP: tl.constexpr, BC: tl.constexpr):
    D: tl.constexpr = _D
    t = tl.program_id(0)
    blk = tl.program_id(1)
    offs_c = blk * BC + tl.arange(0, BC)
    cmask = offs_c < C
    slot = tl.load(cand_ptr + t.to(tl.int64) * C + offs_c, mask=cmask, other=-1).to(tl.int64)
    valid = slot >= 0
    s = tl.where(valid, slot, 0)
    base = (s // _PAGE) * _PAGE_BYTES
    off = s % _PAGE
    offs_d = tl.arange(0, D)
    k = tl.load(kc8_ptr + (base + off * D)[:, None] + offs_d[None, :], mask=valid[:, None], other=0.0)
    ks = tl.load(kcs_ptr + (base // 4 + _SCALES_AT // 4 + off), mask=valid, other=0.0)
    offs_h = tl.arange(0, HP)
    hmask = offs_h < H
    q = tl.load(q_ptr + (t.to(tl.int64) * H + offs_h[:, None]) * D + offs_d[None, :], mask=hmask[:, None], other=0.0)
    w = tl.load(w_ptr + t.to(tl.int64) * H + offs_h, mask=hmask, other=0.0)
    acc = tl.dot(k, tl.trans(q))  # [BC, HP]
    lg = tl.sum(tl.maximum(acc, 0.0) * w[None, :], axis=1) * ks
    lg = tl.where(valid, lg, float("-inf"))
    tl.store(out_ptr + t.to(tl.int64) * C + offs_c, lg, mask=cmask)


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def candidate_config() -> dict:
    if interpreting():
        return dict(BC=32, num_warps=4, num_stages=1)
    return dict(BC=64, num_warps=4, num_stages=2)


def candidate_logits_triton(q_fp8, w, kv_cache, cand, *, out=None, config=None):
    t, h, _ = q_fp8.shape
    c = cand.shape[1]
    cfg = dict(candidate_config(), **(config or {}))
    if out is None:
        out = torch.empty(t, c, device=q_fp8.device, dtype=torch.float32)
    if t == 0 or c == 0:
        return out
    grid = (t, triton.cdiv(c, cfg["BC"]))
    _candidate_logits_kernel[grid](
        q_fp8.contiguous(), w.contiguous(), kv_cache.view(torch.float8_e4m3fn), kv_cache.view(torch.float32),
        cand.contiguous(), out, c, H=h, HP=max(16, _pow2(h)), BC=cfg["BC"], num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"])
    return out
