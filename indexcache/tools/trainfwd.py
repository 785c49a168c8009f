"""The training forward shared by ``train``, ``distill`` and ``eval``: the model's own layers, run in the MHA
("masked") form through ``scaled_dot_product_attention``, with the extras training needs:

- ``dense`` attention over all causal tokens (the top-k is ignored: DSA's dense pre-training / warm-up);
- the indexer fed a *detached* input (DSA sparse stage: the indexer learns only from its KL loss);
- each layer's head-averaged attention probabilities (= DSA's head-summed, L1-normalised target p_t);
- the indexer loss of one F layer against the averaged targets of itself and the S layers it serves
  (the paper's multi-layer distillation; with an all-F pattern this is plain DSA indexer training).

It calls the same modules as ``DSAModel.run_layer`` (tested equal to it in the sparse mode).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..distributed.comm import all_reduce_
from ..model.attention import selection_mask
from ..model.indexer import causal_mask, pool_mask, select_topk
from ..pattern import IndexPattern

STAGES = ("dense", "warmup", "sparse")


def kl_rows(p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per row (last dim); zero-probability entries of p contribute nothing."""
    safe_log_p = torch.log(p.clamp_min(1e-30))
    return torch.where(p > 0, p * (safe_log_p - log_q), torch.zeros_like(p)).sum(-1)


def multi_layer_kl(targets: list[torch.Tensor], log_q: torch.Tensor) -> torch.Tensor:
    """L_multi = sum_j 1/(m+1) * mean_t KL(p^(l+j)_t || q_t) (the paper's B4 loss, averaged over queries)."""
    w = 1.0 / len(targets)
    return sum(w * kl_rows(p, log_q).mean() for p in targets)


def averaged_target_kl(targets: list[torch.Tensor], log_q: torch.Tensor) -> torch.Tensor:
    """L_avg = mean_t KL(p̄_t || q_t) with p̄ the mean target (Proposition 1: same gradient as L_multi)."""
    return kl_rows(torch.stack(targets).mean(0), log_q).mean()


def entropy_rows(p: torch.Tensor) -> torch.Tensor:
    return -torch.where(p > 0, p * torch.log(p.clamp_min(1e-30)), torch.zeros_like(p)).sum(-1)


@dataclass
class LayerOut:
    h: torch.Tensor
    topk: torch.Tensor | None  # the selection this layer attended to (None in dense mode)
    probs: torch.Tensor | None = None  # head-averaged attention probabilities [B,T,S] (detached)
    index_logits: torch.Tensor | None = None  # own indexer scores [B,T,S], -inf where not causal
    pool: torch.Tensor | None = None  # an F layer's published candidate pool (patterns with R layers)


def attention_qkv(attn, x, cos, sin):
    """MHA-form q [B,H,T,qk], k [B,H,T,qk], v [B,H,T,v] and the q LoRA latent, from the model's projections."""
    cfg = attn.cfg
    q_nope, q_pe, q_resid, c_kv, k_pe = attn.project(x, cos, sin)
    B, T, H = q_nope.shape[:3]
    kv = attn.kv_b_proj(c_kv).view(B, T, H, cfg.qk_nope_head_dim + cfg.v_head_dim)
    k_nope, v = kv.split([cfg.qk_nope_head_dim, cfg.v_head_dim], dim=-1)
    q = torch.cat([q_nope, q_pe], -1).transpose(1, 2)
    k = torch.cat([k_nope, k_pe[:, :, None].expand(B, T, H, k_pe.shape[-1])], -1).transpose(1, 2)
    return q, k, v.transpose(1, 2), q_resid


@torch.no_grad()
def head_mean_probs(q, k, allowed, scale: float) -> torch.Tensor:
    """Head-averaged softmax attention [B,T,S] over ``allowed`` [B,T,S] (fp32, no gradient)."""
    s = torch.einsum("bhtd,bhsd->bhts", q.float(), k.float()) * scale
    s = s.masked_fill(~allowed[:, None], float("-inf"))
    return torch.softmax(s, -1).nan_to_num(0.0).mean(1)


def over_all_heads(model, probs: torch.Tensor) -> torch.Tensor:
    """The mean over every head when the model is sharded by heads (each rank averaged its own, equal-sized set):
    the targets are detached, so one all-reduce makes them whole and every rank trains its indexer copy alike."""
    ctx = getattr(model, "parallel", None)
    if ctx is None or ctx.is_single:
        return probs
    return all_reduce_(probs.contiguous(), ctx).div_(ctx.world_size)


@torch.no_grad()
def select_in_chunks(indexer, iq, ik, iw, positions, k: int, pool_in=None, chunk: int = 1024) -> torch.Tensor:
    """select_topk over every query row [B,T,k] from the indexer's projections, ``chunk`` rows at a time: the same
    sets as one select over the whole [B,T,T] score matrix, without holding it (nor its [B,T,heads,T] product)."""
    T = ik.shape[1]
    parts = []
    for a in range(0, iq.shape[1], chunk):
        b = min(a + chunk, iq.shape[1])
        valid = causal_mask(positions[:, a:b], positions)
        if pool_in is not None:
            valid = valid & pool_mask(pool_in[:, a:b], T)
        parts.append(select_topk(indexer.scores(iq[:, a:b], ik, iw[:, a:b]), valid, k))
    return torch.cat(parts, 1)


def run_layer_train(model, i: int, h, cos, sin, positions, *, dense: bool, topk_in=None, want_probs=False,
                    want_index=False, detach_indexer_input=True, pool_in=None, publish: int | None = None,
                    rows: torch.Tensor | None = None) -> LayerOut:
    """One decoder layer. ``topk_in`` is the inherited selection (None: this layer selects with its own indexer).
    Re-rank layers: ``pool_in`` restricts the own selection to an F layer's candidates; ``publish``: this F layer
    also returns its top-``publish`` candidates (sparse mode). ``rows`` (sorted query positions, None: all): the
    returned ``index_logits`` and ``probs`` cover only those query rows, [B,len(rows),T] (the attention output and the
    selection still cover every row)."""
    layer = model.layers[i]
    attn = layer.self_attn
    cfg = model.config
    x = layer.input_layernorm(h)
    q, k, v, q_resid = attention_qkv(attn, x, cos, sin)
    T = x.shape[1]
    causal = causal_mask(positions, positions)
    index_logits = None
    needs_own = not dense and topk_in is None
    if attn.indexer is not None and (want_index or needs_own):
        xi, qi = (x.detach(), q_resid.detach()) if detach_indexer_input else (x, q_resid)
        iq, ik, iw = attn.indexer.project(xi, qi, cos, sin)
        if rows is None:
            index_logits = attn.indexer.scores(iq, ik, iw).masked_fill(~causal, float("-inf"))
        elif want_index:
            index_logits = attn.indexer.scores(iq[:, rows], ik, iw[:, rows]).masked_fill(~causal[:, rows],
                                                                                        float("-inf"))
    if dense:
        topk, allowed = None, causal
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=cfg.softmax_scale)
    else:
        pool = None
        if topk_in is None:
            if attn.indexer is None:
                raise ValueError(f"layer {i} has no indexer and no inherited top-k")
            if rows is None:
                valid = causal if pool_in is None else causal & pool_mask(pool_in, T)
                topk = select_topk(index_logits.detach(), valid, cfg.index_topk)
                if publish:
                    pool = select_topk(index_logits.detach(), valid, publish)
            else:  # the sampled rows' logits cannot select for every row: score them all again, without gradient
                topk = select_in_chunks(attn.indexer, iq, ik, iw, positions, cfg.index_topk, pool_in)
                if publish:
                    pool = select_in_chunks(attn.indexer, iq, ik, iw, positions, publish, pool_in)
        else:
            topk = topk_in
        allowed = selection_mask(topk, T) & causal
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed[:, None], scale=cfg.softmax_scale)
    if want_probs:
        qr, ar = (q, allowed) if rows is None else (q[:, :, rows], allowed[:, rows])
        probs = over_all_heads(model, head_mean_probs(qr, k, ar, cfg.softmax_scale))
    else:
        probs = None
    h = h + attn.o_proj(out.transpose(1, 2).flatten(2))
    h = h + layer.mlp(layer.post_attention_layernorm(h))
    return LayerOut(h, topk, probs, index_logits, None if dense else pool)


def index_loss_rows(length: int, n: int | None, gen: torch.Generator | None = None) -> torch.Tensor | None:
    """Sorted query positions of a ``length``-token window that the indexer loss covers: ``n`` drawn uniformly
    without replacement (``gen``), or None (every row) when ``n`` is None or not below ``length``."""
    if n is None or n >= length:
        return None
    if n < 1:
        raise ValueError(f"index_rows must be a positive number of query rows or None, got {n!r}")
    return torch.randperm(length, generator=gen)[:n].sort().values


def forward_train(model, ids: torch.Tensor, stage: str, pattern: IndexPattern | None = None, *,
                  index_backward: bool = True, index_coef: float = 1.0, index_rows: int | None = None,
                  gen: torch.Generator | None = None):
    """One training forward of ``stage`` ('dense' | 'warmup' | 'sparse') under ``pattern`` (default: model's).

    Returns (lm_loss or None, index_loss float or None). The indexer loss of each F layer (against the averaged
    attention of itself and the S layers it serves) is back-propagated right away when ``index_backward``: the
    indexer's input is detached, so its graph is separate from the LM graph and is freed layer by layer.
    ``index_rows``: the indexer loss covers that many query rows drawn from the window (``gen``; the same rows in
    every layer and batch row), an unbiased estimate of the mean over all rows at that share of the [B,T,T] score
    and [B,heads,T,T] attention-probability work (None: all rows).
    """
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    p = model.resolve_pattern(pattern)
    B, T = ids.shape
    positions = torch.arange(T, device=ids.device).expand(B, T)
    inp = ids[:, :-1]
    pos = positions[:, :-1]
    rows = index_loss_rows(T - 1, index_rows, gen) if stage != "dense" else None
    rows = None if rows is None else rows.to(ids.device)
    h = model.embed(inp)
    cos, sin = model.rope(pos, h.dtype)
    dense = stage != "sparse"
    want_index = stage in ("warmup", "sparse")
    topk, group_logq, group_targets, index_losses = None, None, [], []
    pool = None  # the last F layer's candidate pool (patterns with R layers, sparse stage)
    publish = model.pool_size(p) if p.has_rerank else None

    def close_group():
        if group_logq is not None and group_targets:
            loss = multi_layer_kl(group_targets, group_logq)
            if index_backward and loss.requires_grad:
                (index_coef * loss).backward()
            index_losses.append(float(loss.detach()))

    for i in range(len(model.layers)):
        full = p.has_indexer(i)  # F, or R (its own indexer over the pool): each starts a distillation group
        out = run_layer_train(model, i, h, cos, sin, pos, dense=dense, topk_in=None if full else topk,
                              want_probs=want_index, want_index=want_index and full,
                              pool_in=pool if p.is_rerank(i) and not dense else None,
                              publish=publish if p.is_full(i) else None, rows=rows)
        if p.is_full(i):
            pool = out.pool
        if full and want_index:
            close_group()
            logits = out.index_logits
            if stage == "sparse":  # restrict q to the selected set (the targets are over it already)
                chosen = out.topk if rows is None else out.topk[:, rows]
                logits = logits.masked_fill(~selection_mask(chosen, logits.shape[-1]), float("-inf"))
            group_logq, group_targets = torch.log_softmax(logits, -1), []
        if want_index:
            group_targets.append(out.probs)
        h, topk = out.h, out.topk
    close_group()
    lm = None
    if stage != "warmup":
        logits = model.head(h)
        lm = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    index_loss = sum(index_losses) / len(index_losses) if index_losses else None
    return lm, index_loss


@torch.no_grad()
def dense_logits(model, ids: torch.Tensor) -> torch.Tensor:
    """Logits [B,T,vocab] of ``ids`` [B,T] with dense causal attention in every layer, the indexers unused: the
    model as the copy and dense stages train it (before the indexer warm-up its top-k is an untrained one's)."""
    B, T = ids.shape
    positions = torch.arange(T, device=ids.device).expand(B, T)
    h = model.embed(ids)
    cos, sin = model.rope(positions, h.dtype)
    for i in range(len(model.layers)):
        h = run_layer_train(model, i, h, cos, sin, positions, dense=True).h
    return model.head(h)


def lm_loss(model, ids: torch.Tensor, pattern=None) -> tuple[float, int]:
    """(summed next-token NLL in nats, number of predicted tokens) with the model's own forward."""
    with torch.no_grad():
        logits = model(ids[:, :-1], pattern=pattern).logits.float()
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum")
    return float(nll), ids[:, 1:].numel()


def bits_per_byte(nats_per_token: float) -> float:
    return nats_per_token / math.log(2)
