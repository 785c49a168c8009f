"""The lightning indexer: scores[t, s] = sum_h w[t, h] * ReLU(q[t, h] . k[s]) / sqrt(d), then top-k per query.

This is the exact (fp32, no Hadamard, no FP8) form; it is mathematically the reference's score up to FP8
quantisation noise, and it is what transformers computes. The FP8 kernels in ``indexcache.kernels.indexer``
are checked against it by top-k recall.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .rope import apply_rope


class Indexer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.head_dim, self.rope_dim = cfg.index_n_heads, cfg.index_head_dim, cfg.qk_rope_head_dim
        self.topk = cfg.index_topk
        self.rope_interleaved = cfg.indexer_rope_interleaved
        self.wq_b = nn.Linear(cfg.q_lora_rank, self.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(cfg.hidden_size, self.head_dim, bias=False)
        self.k_norm = nn.LayerNorm(self.head_dim, eps=1e-6)
        self.weights_proj = nn.Linear(cfg.hidden_size, self.n_heads, bias=False)

    def project(self, x: torch.Tensor, q_resid: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, pre=None):
        """q [B,T,H,D], k [B,T,D] (rope on the FIRST rope_dim dims) and head weights w [B,T,H] (fp32, * H^-1/2).

        ``pre``: (wk(x), weights_proj(x) or None) when the caller computed them already."""
        B, T, _ = x.shape
        q = self.wq_b(q_resid).view(B, T, self.n_heads, self.head_dim)
        k_lin, w_lin = pre if pre is not None else (self.wk(x), None)
        if w_lin is None:
            w_lin = self.weights_proj(x.to(self.weights_proj.weight.dtype))
        k = self.k_norm(k_lin)
        r = self.rope_dim
        q = torch.cat([apply_rope(q[..., :r], cos[:, :, None], sin[:, :, None], self.rope_interleaved), q[..., r:]], -1)
        k = torch.cat([apply_rope(k[..., :r], cos, sin, self.rope_interleaved), k[..., r:]], -1)
        w = w_lin.float() * self.n_heads ** -0.5
        return q, k, w

    def scores(self, q: torch.Tensor, k: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """fp32 scores [B,T,S] for queries q [B,T,H,D] against keys k [B,S,D] (no mask)."""
        logits = torch.einsum("bthd,bsd->bths", q.float(), k.float()) * self.head_dim ** -0.5
        return torch.einsum("bth,bths->bts", w, F.relu(logits))

    def forward(self, x, q_resid, cos, sin, positions: torch.Tensor, pool: torch.Tensor | None = None,
                publish: int | None = None):
        """Top-k key indices [B,T,k] (int32, -1 = no token) over keys 0..T-1 with causal positions.

        ``pool`` [B,T,c] (-1 = none): only these keys compete (a re-rank layer). ``publish``: an F layer that
        serves re-rank layers also returns its top-``publish`` candidates: ``Selection(topk, pool)``."""
        q, k, w = self.project(x, q_resid, cos, sin)
        s = self.scores(q, k, w)
        valid = causal_mask(positions, positions)
        if pool is not None:
            valid = valid & pool_mask(pool, s.shape[-1])
        topk = select_topk(s, valid, self.topk)
        if publish:
            return Selection(topk, select_topk(s, valid, publish))
        return topk


class Selection(NamedTuple):
    """What flows between layers of a pattern with re-rank (R) layers: the top-k in flight (from the last F or R
    layer, for S layers to copy) and the candidate pool of the last F layer (for R layers to re-rank)."""
    topk: torch.Tensor  # [B,T,k] int32
    pool: torch.Tensor  # [B,T,c] int32


def causal_mask(q_positions: torch.Tensor, k_positions: torch.Tensor) -> torch.Tensor:
    """[B,T,S] bool: key s is visible to query t."""
    return k_positions[:, None, :] <= q_positions[:, :, None]


def pool_mask(pool: torch.Tensor, num_keys: int) -> torch.Tensor:
    """[B,T,S] bool: key s is in the row's candidate pool [B,T,c] (-1 entries select nothing)."""
    idx = torch.where(pool < 0, num_keys, pool).long()
    mask = torch.zeros(*pool.shape[:-1], num_keys + 1, dtype=torch.bool, device=pool.device)
    return mask.scatter_(-1, idx, True)[..., :num_keys]


def select_topk(scores: torch.Tensor, valid: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k highest valid scores per row, int32, with -1 where fewer than k keys are valid."""
    scores = scores.masked_fill(~valid, float("-inf"))
    kk = min(k, scores.shape[-1])
    vals, idx = scores.topk(kk, dim=-1)
    idx = idx.to(torch.int32).masked_fill(vals == float("-inf"), -1)
    if kk < k:
        idx = F.pad(idx, (0, k - kk), value=-1)
    return idx
