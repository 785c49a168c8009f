"""FP8 indexer top-k recall against the non-quantised fp32 scores (benchmarks/kernels_indexer.py and the tests).

Input families (``make_case``):
  random    q, k, weights ~ N(0,1)                         (worst case: no structure, many near-ties)
  structured low-rank shared q/k signal + noise, a few strongly attended keys (sinks / recent-like spikes)
  outlier   structured + 4 outlier channels at 30x in q and k (what Hadamard rotation is for)
"""
from __future__ import annotations

import torch

from indexcache.kernels.indexer import (
    indexer_logits,
    indexer_logits_fp32,
    quantize_indexer_k,
    quantize_indexer_q,
    topk_recall,
    topk_rows_torch,
)

KINDS = ("random", "structured", "outlier")


def make_case(kind: str, t: int, s: int, h: int, *, seed: int = 0, device="cpu"):
    """(q [T,H,128], weights [T,H], k [S,128], row_start, row_end) for queries at the end of a causal prefix of S keys."""
    if kind not in KINDS:
        raise ValueError(f"make_case: kind must be one of {KINDS}, got {kind!r}")
    g = torch.Generator().manual_seed(seed)
    d = 128
    weights = torch.randn(t, h, generator=g)
    if kind == "random":
        q = torch.randn(t, h, d, generator=g)
        k = torch.randn(s, d, generator=g)
    else:
        r = 16
        basis = torch.linalg.qr(torch.randn(d, r, generator=g))[0].T  # [r, d] orthonormal rows
        k = torch.randn(s, r, generator=g) @ basis * 2.0 + torch.randn(s, d, generator=g) * 0.5
        strong = torch.randperm(s, generator=g)[: max(1, s // 256)]
        k[strong] += torch.randn(len(strong), r, generator=g) @ basis * 6.0
        q = torch.randn(t, h, r, generator=g) @ basis * 1.5 + torch.randn(t, h, d, generator=g) * 0.5
        weights = weights.abs() * 0.5 + 0.1 * torch.randn(t, h, generator=g)  # mostly positive head weights
        if kind == "outlier":
            ch = torch.randperm(d, generator=g)[:4]
            k[:, ch] *= 30.0
            q[..., ch] *= 30.0
    row_end = torch.arange(s - t + 1, s + 1, dtype=torch.int32)
    row_start = torch.zeros(t, dtype=torch.int32)
    dev = torch.device(device)
    return q.to(dev), weights.to(dev), k.to(dev), row_start.to(dev), row_end.to(dev)


def fp8_recall(q, weights, k, row_start, row_end, topk: int, *, hadamard: bool = False, logits_fn=None,
               topk_fn=None) -> float:
    """Recall of the FP8 indexer's top-k (quantise -> logits_fn -> top-k) against fp32 scores' top-k."""
    logits_fn = logits_fn or indexer_logits
    topk_fn = topk_fn or topk_rows_torch
    ref = indexer_logits_fp32(q, weights, k, row_start, row_end)
    idx_ref = topk_rows_torch(ref, topk, row_start=row_start, row_end=row_end)
    q8, w = quantize_indexer_q(q, weights, hadamard=hadamard)
    k8, ks = quantize_indexer_k(k, hadamard=hadamard)
    lg = logits_fn(q8, w, k8, ks, row_start, row_end)
    idx = topk_fn(lg, topk, row_start=row_start, row_end=row_end)
    return topk_recall(idx, idx_ref)
