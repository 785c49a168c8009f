"""Multi-head latent attention (MLA) restricted to the indexer's selected tokens.

Two reference forms of the same maths:
- ``masked``: the MHA form (K/V decompressed with kv_b_proj, dense scores, -inf outside the selection); cheap at
  short context and differentiable, so training and the transformers comparison use it.
- ``absorbed``: the MQA form the kernels use. Per head W_UK folds into the query (q_lat = W_UK^T q_nope, 512 dims,
  plus 64 rope dims = 576), attention runs over gathered latent rows [c_kv | k_pe] and W_UV is applied after.
"""
from __future__ import annotations

import torch
from torch import nn

from ..config import ModelConfig
from .indexer import Indexer, causal_mask
from .norm import RMSNorm
from .rope import apply_rope

ATTN_IMPLS = ("masked", "absorbed")


class MLA(nn.Module):
    def __init__(self, cfg: ModelConfig, has_indexer: bool):
        super().__init__()
        self.cfg = cfg
        h = cfg.num_heads
        self.num_local_heads = h  # heads this module computes: fewer after tensor-parallel sharding
        self.q_a_proj = nn.Linear(cfg.hidden_size, cfg.q_lora_rank, bias=False)
        self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, 1e-6)
        self.q_b_proj = nn.Linear(cfg.q_lora_rank, h * cfg.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(cfg.hidden_size, cfg.kv_lora_rank + cfg.qk_rope_head_dim, bias=False)
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank, 1e-6)
        self.kv_b_proj = nn.Linear(cfg.kv_lora_rank, h * (cfg.qk_nope_head_dim + cfg.v_head_dim), bias=False)
        self.o_proj = nn.Linear(h * cfg.v_head_dim, cfg.hidden_size, bias=False)
        # Shared (S) layers own no indexer at all: no parameters, nothing to load.
        self.indexer = Indexer(cfg) if has_indexer else None

    def project(self, x, cos, sin, pre=None):
        """q_nope [B,T,h,nope], q_pe [B,T,h,rope] (rotated), q_resid, c_kv [B,T,kv_lora], k_pe [B,T,rope].

        ``pre``: (q_a_proj(x), kv_a_proj_with_mqa(x)) when the caller computed them already (the engine runs every
        projection of x in one GEMM)."""
        cfg = self.cfg
        B, T, _ = x.shape
        q_a, kv = pre if pre is not None else (self.q_a_proj(x), self.kv_a_proj_with_mqa(x))
        q_resid = self.q_a_layernorm(q_a)
        q = self.q_b_proj(q_resid).view(B, T, self.num_local_heads, cfg.qk_head_dim)
        q_nope, q_pe = q.split([cfg.qk_nope_head_dim, cfg.qk_rope_head_dim], dim=-1)
        c_kv, k_pe = kv.split([cfg.kv_lora_rank, cfg.qk_rope_head_dim], dim=-1)
        c_kv = self.kv_a_layernorm(c_kv)
        q_pe = apply_rope(q_pe, cos[:, :, None], sin[:, :, None], cfg.mla_rope_interleaved)
        k_pe = apply_rope(k_pe, cos, sin, cfg.mla_rope_interleaved)
        return q_nope, q_pe, q_resid, c_kv, k_pe

    def absorbed_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """W_UK [h, nope, kv_lora] and W_UV [h, v, kv_lora] split out of kv_b_proj."""
        cfg = self.cfg
        w = self.kv_b_proj.weight.view(self.num_local_heads, cfg.qk_nope_head_dim + cfg.v_head_dim, cfg.kv_lora_rank)
        return w[:, : cfg.qk_nope_head_dim], w[:, cfg.qk_nope_head_dim:]

    def forward(self, x, cos, sin, positions, topk=None, attn_impl: str = "masked", pool=None, pool_size=None):
        """Returns (output [B,T,hidden], top-k indices [B,T,k] used by this layer).

        Re-rank layers: ``pool`` [B,T,c] restricts this layer's indexer to those candidates. ``pool_size``: this F
        layer publishes its top-``pool_size`` (it returns ``Selection(topk, pool)`` instead of the top-k)."""
        q_nope, q_pe, q_resid, c_kv, k_pe = self.project(x, cos, sin)
        selection = topk
        if self.indexer is not None and topk is None:
            selection = topk = self.indexer(x, q_resid, cos, sin, positions, pool, pool_size)
            if pool_size:
                topk = selection.topk
        if topk is None:
            raise ValueError("a shared (S) layer needs the top-k indices of a preceding full (F) layer")
        if attn_impl == "masked":
            out = self._masked(q_nope, q_pe, c_kv, k_pe, topk, positions)
        elif attn_impl == "absorbed":
            out = self._absorbed(q_nope, q_pe, c_kv, k_pe, topk, positions)
        else:
            raise ValueError(f"attn_impl must be one of {ATTN_IMPLS}, got {attn_impl!r}")
        return self.o_proj(out.flatten(2)), selection

    def _masked(self, q_nope, q_pe, c_kv, k_pe, topk, positions):
        cfg = self.cfg
        B, T = q_nope.shape[:2]
        kv = self.kv_b_proj(c_kv).view(B, T, self.num_local_heads, cfg.qk_nope_head_dim + cfg.v_head_dim)
        k_nope, v = kv.split([cfg.qk_nope_head_dim, cfg.v_head_dim], dim=-1)
        scores = torch.einsum("bthd,bshd->bhts", q_nope, k_nope) + torch.einsum("bthd,bsd->bhts", q_pe, k_pe)
        allowed = selection_mask(topk, T) & causal_mask(positions, positions)
        scores = (scores.float() * cfg.softmax_scale).masked_fill(~allowed[:, None], float("-inf"))
        p = torch.softmax(scores, dim=-1).nan_to_num(0.0).to(v.dtype)  # a row with no key attends to nothing
        return torch.einsum("bhts,bshd->bthd", p, v)

    def _absorbed(self, q_nope, q_pe, c_kv, k_pe, topk, positions):
        cfg = self.cfg
        w_uk, w_uv = self.absorbed_weights()
        q_lat = torch.einsum("bthd,hdc->bthc", q_nope, w_uk)
        q_full = torch.cat([q_lat, q_pe], dim=-1)  # [B,T,h,576]
        kv = torch.cat([c_kv, k_pe], dim=-1)  # [B,S,576]
        o_lat, _ = sparse_attention_reference(q_full, kv, topk, positions, cfg.softmax_scale, cfg.kv_lora_rank)
        return torch.einsum("bthc,hdc->bthd", o_lat, w_uv)


def selection_mask(topk: torch.Tensor, num_keys: int) -> torch.Tensor:
    """[B,T,S] bool from top-k indices [B,T,k]; -1 entries select nothing."""
    idx = torch.where(topk < 0, num_keys, topk).long()
    mask = torch.zeros(*topk.shape[:-1], num_keys + 1, dtype=torch.bool, device=topk.device)
    return mask.scatter_(-1, idx, True)[..., :num_keys]


def sparse_attention_reference(q, kv, topk, positions, sm_scale: float, d_v: int):
    """Absorbed sparse attention over gathered latent rows.

    q [B,T,h,576], kv [B,S,576], topk [B,T,k] -> (o_lat [B,T,h,d_v], lse [B,T,h] natural log).
    Indices that are -1 or point past the query's position are ignored.
    """
    B, T, k = topk.shape
    valid = topk >= 0
    idx = topk.clamp(min=0).long()
    gathered = torch.gather(kv[:, None].expand(B, T, *kv.shape[1:]), 2,
                            idx[..., None].expand(B, T, k, kv.shape[-1]))  # [B,T,k,576]
    key_pos = torch.gather(positions[:, None, :].expand(B, T, -1), 2, idx)
    valid &= key_pos <= positions[:, :, None]
    s = torch.einsum("bthc,btkc->bthk", q.float(), gathered.float()) * sm_scale
    s = s.masked_fill(~valid[:, :, None], float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse[..., None]).nan_to_num(0.0)
    o = torch.einsum("bthk,btkc->bthc", p, gathered[..., :d_v].float())
    return o.to(q.dtype), lse
