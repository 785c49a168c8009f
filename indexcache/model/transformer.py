"""The DSA decoder: embeddings -> N x (RMSNorm, MLA with indexer or reused top-k, RMSNorm, MLP/MoE) -> logits.

No global state, no cache ownership: the engine keeps caches, this module is the readable ground truth that
kernels, tools and the engine are checked against.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..config import ModelConfig
from ..pattern import DEFAULT_POOL_FACTOR, IndexPattern, LayerPlan, PatternError
from .attention import MLA
from .indexer import Selection
from .moe import MLP, MoE
from .norm import RMSNorm
from .rope import RotaryEmbedding


@dataclass
class DSAOutput:
    logits: torch.Tensor
    topk_indices: list[torch.Tensor] | None = None  # one [B,T,k] int32 tensor per layer when requested


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = MLA(cfg, has_indexer=cfg.pattern.has_indexer(layer))
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size) if cfg.mlp_layer_types[layer] == "dense" else MoE(cfg)

    def forward(self, h, cos, sin, positions, topk=None, attn_impl="masked", pool=None, pool_size=None):
        a, topk = self.self_attn(self.input_layernorm(h), cos, sin, positions, topk, attn_impl, pool, pool_size)
        h = h + a
        return h + self.mlp(self.post_attention_layernorm(h)), topk


class DSAModel(nn.Module):
    """A DeepSeek-V3.2 / GLM-5 style causal LM with IndexCache layer patterns."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.rotary = RotaryEmbedding(cfg)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    @property
    def pattern(self) -> IndexPattern:
        return self.config.pattern

    # ----- pieces, so tools can run part of the stack (greedy search caches hidden states by layer) -------------
    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        _check_ids(input_ids, self.config.vocab_size)
        return self.embed_tokens(input_ids)

    def rope(self, positions: torch.Tensor, dtype: torch.dtype):
        return self.rotary(positions, dtype)

    def run_layer(self, i: int, h, cos, sin, positions, prev_topk, pattern: IndexPattern, attn_impl="masked",
                  pool: int | None = None):
        """One decoder layer under ``pattern``: F layers compute top-k, S layers reuse ``prev_topk``.

        Patterns with R layers pass a ``Selection`` (top-k in flight, F layer's candidate pool) from layer to layer
        instead of a top-k tensor; ``pool`` is the pool size (default: the pattern's, else 4 x top-k)."""
        if not pattern.has_rerank:
            topk = None if pattern.is_full(i) else prev_topk
            return self.layers[i](h, cos, sin, positions, topk, attn_impl)
        if pattern.is_full(i):
            c = self.pool_size(pattern, pool)
            return self.layers[i](h, cos, sin, positions, None, attn_impl, pool_size=c)
        if not isinstance(prev_topk, Selection):
            raise ValueError(f"layer {i} of pattern {pattern} needs the Selection of the layers before it")
        if pattern.is_rerank(i):
            h, topk = self.layers[i](h, cos, sin, positions, None, attn_impl, pool=prev_topk.pool)
            return h, Selection(topk, prev_topk.pool)
        h, _ = self.layers[i](h, cos, sin, positions, prev_topk.topk, attn_impl)
        return h, prev_topk

    def pool_size(self, pattern: IndexPattern, pool: int | None = None) -> int:
        """The candidate pool F layers publish for R layers: ``pool``, else the pattern's, else 4 x top-k."""
        c = pool if pool is not None else pattern.pool
        c = c if c is not None else DEFAULT_POOL_FACTOR * self.config.index_topk
        if isinstance(c, bool) or not isinstance(c, int) or c < self.config.index_topk:
            raise PatternError(f"the candidate pool for re-rank layers must be an integer >= top-k "
                               f"({self.config.index_topk}), got {c!r}")
        return c

    def head(self, h: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.norm(h))

    def layer_plan(self, pattern=None, pool: int | None = None) -> LayerPlan:
        """The per-layer plan of a forward under ``pattern`` (None: the pattern the model was built with);
        ``pool``: the candidate-pool size when the pattern has R layers (default: the pattern's, else 4 x top-k)."""
        p = self.resolve_pattern(pattern)
        return LayerPlan(p, self.pool_size(p, pool) if p.has_rerank else None)

    def resolve_pattern(self, pattern) -> IndexPattern:
        """A runtime pattern may only use indexers this model has (it can turn F layers into S, not back).

        The model's own pattern (``config.pattern``) is fixed when it is built (``load_model(...,
        index_pattern=...)``): S layers get no indexer weights. A runtime pattern only chooses which of the built
        indexers run."""
        if pattern is None:
            return self.config.pattern
        p = IndexPattern.parse(pattern, self.config.num_layers)
        missing = [i for i in p.full_layers if self.layers[i].self_attn.indexer is None]
        if missing:
            raise PatternError(f"pattern {p} marks layers {missing} full, but this model has no indexer weights "
                               f"there (built with pattern {self.config.pattern})")
        missing = [i for i in p.rerank_layers if self.layers[i].self_attn.indexer is None]
        if missing:
            raise PatternError(f"pattern {p} marks layers {missing} re-rank (R), which needs the layer's own "
                               f"indexer weights; this model has none there (built with pattern "
                               f"{self.config.pattern})")
        return p

    def forward(self, input_ids: torch.Tensor, *, positions: torch.Tensor | None = None, pattern=None,
                return_topk: bool = False, attn_impl: str = "masked", pool: int | None = None) -> DSAOutput:
        """input_ids [B,T] -> logits [B,T,vocab]; ``return_topk`` also returns every layer's indices (the top-k it
        attended with). ``pool``: candidate-pool size for R layers (default: the pattern's, else 4 x top-k)."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
        p = self.resolve_pattern(pattern)
        B, T = input_ids.shape
        if positions is None:
            positions = torch.arange(T, device=input_ids.device).expand(B, T)
        h = self.embed(input_ids)
        cos, sin = self.rope(positions, h.dtype)
        topk, all_topk = None, []
        if p.has_rerank:
            self.pool_size(p, pool)  # a bad pool size fails before any work
        for i in range(len(self.layers)):
            h, topk = self.run_layer(i, h, cos, sin, positions, topk, p, attn_impl, pool)
            if return_topk:
                all_topk.append(topk.topk if isinstance(topk, Selection) else topk)
        return DSAOutput(self.head(h), all_topk if return_topk else None)

    # ----- facts ------------------------------------------------------------------------------------------------
    def indexer_param_bytes_per_layer(self) -> int:
        return self.config.indexer_params_per_layer * self.embed_tokens.weight.element_size()

    def indexer_bytes_saved(self) -> int:
        """Parameter bytes not held because S layers have no indexer."""
        return len(self.config.pattern.shared_layers) * self.indexer_param_bytes_per_layer()

    @torch.no_grad()
    def init_random(self, seed: int = 0, std: float = 0.02, mlp_out_std: float | None = None) -> "DSAModel":
        """Random weights for presets and benchmarks (deterministic for a seed, independent of device).

        ``mlp_out_std``: std of the MLP/expert output projections (None: ``std``; 0: they start at zero, so the
        MLPs add nothing to the residual stream until trained). The other weights are drawn the same either way."""
        device = self.embed_tokens.weight.device
        g = torch.Generator(device=device).manual_seed(seed)
        out_std = std if mlp_out_std is None else mlp_out_std
        for name, p in self.named_parameters():
            if name.endswith("norm.weight") or name.endswith("layernorm.weight") or name.endswith("k_norm.weight"):
                p.fill_(1.0)
            elif name.endswith(".bias"):
                p.zero_()
            elif ".mlp." in name and (name.endswith("down_proj.weight") or name.endswith("experts.down")):
                p.normal_(0.0, out_std, generator=g)  # same draws as ``std`` (scaled), so the rest is unchanged
            else:
                p.normal_(0.0, std, generator=g)
        for name, b in self.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.normal_(0.0, 0.01, generator=g)
        return self


def _check_ids(input_ids: torch.Tensor, vocab: int) -> None:
    if input_ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"input_ids must be an integer tensor, got {input_ids.dtype}")
    if input_ids.numel():
        lo, hi = int(input_ids.min()), int(input_ids.max())
        if lo < 0 or hi >= vocab:
            bad = lo if lo < 0 else hi
            raise ValueError(f"token id {bad} is outside the vocabulary [0, {vocab})")
