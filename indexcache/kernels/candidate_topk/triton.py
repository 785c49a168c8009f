"""Triton kernel for re-rank scoring: logits of per-query candidate pools over the paged FP8 indexer-key cache.

One program owns one query row and a span of its candidates (the whole pool when there are enough rows to fill
the GPU; decode-sized batches split the pool over programs). It loads the row's q [H,128] e4m3 and w once, then
walks the span in blocks of BC candidates, software-pipelined (``num_stages``: the slot ids of a later block and
the gather of its keys are in flight while the current block is multiplied):
    acc[BC, HP] = k_fp8[cand] @ q_fp8^T  ->  relu -> * w -> sum over heads -> * k_scale
(-inf where the slot id is -1), keys and fp32 scales gathered from the 132-B/token paged layout
(``kernels.formats``). The heads are the MMA's N dimension, the candidates its M. The top-k of the row is then
taken by ``kernels.topk``.
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
_PROGRAMS_PER_SM = 4  # decode-sized batches: split each pool so that rows x parts fill the GPU this many times


@triton.jit(do_not_specialize=["C", "SPAN"])
def _candidate_logits_kernel(q_ptr, w_ptr, kc8_ptr, kcs_ptr, cand_ptr, out_ptr, C, SPAN,
                             H: tl.constexpr, HP: tl.constexpr, BC: tl.constexpr, STAGES: tl.constexpr):
    D: tl.constexpr = _D
    t = tl.program_id(0).to(tl.int64)
    c_lo = tl.program_id(1) * SPAN
    c_hi = tl.minimum(c_lo + SPAN, C)
    offs_h = tl.arange(0, HP)
    offs_d = tl.arange(0, D)
    hmask = offs_h < H
    q = tl.load(q_ptr + (t * H + offs_h[:, None]) * D + offs_d[None, :], mask=hmask[:, None], other=0.0)
    qt = tl.trans(q)  # [D, HP]: K-major B operand
    w = tl.load(w_ptr + t * H + offs_h, mask=hmask, other=0.0)
    row_cand = cand_ptr + t * C
    row_out = out_ptr + t * C
    for c0 in tl.range(c_lo, c_hi, BC, num_stages=STAGES):
        offs_c = c0 + tl.arange(0, BC)
        cmask = offs_c < c_hi
        slot = tl.load(row_cand + offs_c, mask=cmask, other=-1).to(tl.int64)
        valid = slot >= 0
        s = tl.where(valid, slot, 0)
        base = (s // _PAGE) * _PAGE_BYTES
        off = s % _PAGE
        # unmasked gathers (a -1 reads slot 0, a real slot): a masked gather here trips Triton 3.7's layout
        # pass on sm_90; the -1 entries are set to -inf below
        k = tl.load(kc8_ptr + (base + off * D)[:, None] + offs_d[None, :])
        ks = tl.load(kcs_ptr + (base // 4 + _SCALES_AT // 4 + off))
        acc = tl.dot(k, qt)  # [BC, HP] fp32
        lg = tl.sum(tl.maximum(acc, 0.0) * w[None, :], axis=1) * ks
        tl.store(row_out + offs_c, tl.where(valid, lg, float("-inf")), mask=cmask)


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def candidate_config() -> dict:
    """BC candidates per block, warps, pipeline stages (num_stages of the candidate loop)."""
    if interpreting():
        return dict(BC=32, num_warps=4, num_stages=1)
    return dict(BC=128, num_warps=4, num_stages=3)


def candidate_span(t: int, c: int, bc: int, sms: int) -> int:
    """Candidates per program: the whole pool (rounded up to blocks) when there are rows enough for
    ``_PROGRAMS_PER_SM`` programs per SM, else the pool split into equal block-aligned spans."""
    blocks = triton.cdiv(max(c, 1), bc)
    parts = max(1, min(blocks, triton.cdiv(_PROGRAMS_PER_SM * sms, max(t, 1))))
    return triton.cdiv(blocks, parts) * bc


def candidate_logits_triton(q_fp8, w, kv_cache, cand, *, out=None, config=None):
    t, h, _ = q_fp8.shape
    c = cand.shape[1]
    cfg = dict(candidate_config(), **(config or {}))
    if out is None:
        out = torch.empty(t, c, device=q_fp8.device, dtype=torch.float32)
    if t == 0 or c == 0:
        return out
    sms = torch.cuda.get_device_properties(q_fp8.device).multi_processor_count if q_fp8.is_cuda else 1
    span = cfg.get("span") or candidate_span(t, c, cfg["BC"], sms)
    grid = (t, triton.cdiv(c, span))
    _candidate_logits_kernel[grid](
        q_fp8.contiguous(), w.contiguous(), kv_cache.view(torch.float8_e4m3fn), kv_cache.view(torch.float32),
        cand.contiguous(), out, c, span, H=h, HP=max(16, _pow2(h)), BC=cfg["BC"], STAGES=cfg["num_stages"],
        num_warps=cfg["num_warps"])
    return out
