"""Modules that replace parts of a DSAModel on one rank. Each keeps the replaced module's parameter names, so
checkpoints, tools and the engine see the same model; the ``ParallelContext`` is held, never looked up."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..model.indexer import Indexer, Selection, causal_mask, pool_mask, select_topk
from ..model.moe import Experts
from ..model.rope import apply_rope
from .comm import all_gather, all_reduce_, gather_strided, strided_rows
from .context import ParallelContext


class VocabParallelEmbedding(nn.Module):
    """Rows [start, start + weight.shape[0]) of the table; ids of other ranks look up zeros, one all-reduce sums."""

    def __init__(self, weight: torch.Tensor, start: int, num_embeddings: int, ctx: ParallelContext):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=weight.requires_grad)
        self.start, self.num_embeddings, self.ctx = start, num_embeddings, ctx

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.start
        mine = (local >= 0) & (local < self.weight.shape[0])
        if self.weight.shape[0]:
            out = F.embedding(local.masked_fill(~mine, 0), self.weight).masked_fill(~mine[..., None], 0.0)
        else:  # a vocabulary smaller than the ranks' chunks leaves the last ranks nothing
            out = self.weight.new_zeros(*ids.shape, self.weight.shape[1])
        return all_reduce_(out, self.ctx)


class VocabParallelLMHead(nn.Module):
    """Vocabulary rows in chunks of ``per``: local logits, padded to ``per``, all-gathered and trimmed to V."""

    def __init__(self, weight: torch.Tensor, per: int, vocab: int, ctx: ParallelContext):
        super().__init__()
        self.weight = weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight, requires_grad=False)
        self.per, self.vocab, self.ctx = per, vocab, ctx

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight)
        if y.shape[-1] < self.per:
            y = F.pad(y, (0, self.per - y.shape[-1]))
        return all_gather(y, self.ctx).movedim(0, -2).flatten(-2)[..., : self.vocab]


class ExpertParallelExperts(Experts):
    """Experts [first, first + E_local) of the router's E; pairs routed elsewhere add nothing here (the MoE's
    all-reduce brings them in from their owners)."""

    def __init__(self, gate_up: torch.Tensor, down: torch.Tensor, inter: int, first: int):
        nn.Module.__init__(self)
        self.inter, self.first = inter, first
        self.gate_up = nn.Parameter(gate_up, requires_grad=gate_up.requires_grad)
        self.down = nn.Parameter(down, requires_grad=down.requires_grad)

    def forward(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, **kw) -> torch.Tensor:
        local = ids - self.first
        mine = (local >= 0) & (local < self.gate_up.shape[0])
        if x.is_cuda and torch.cuda.is_current_stream_capturing():
            # fixed shapes for graph capture: every pair runs, other ranks' pairs with weight 0
            return super().forward(x, local.clamp(0, self.gate_up.shape[0] - 1), weights.masked_fill(~mine, 0.0), **kw)
        tok, slot = mine.nonzero(as_tuple=True)
        if not tok.numel():
            return torch.zeros_like(x)
        y = super().forward(x[tok], local[tok, slot][:, None], weights[tok, slot][:, None], **kw)
        # per (token, slot), then summed over slots in fp32 in a fixed order (as Experts does): no atomics
        pairs = x.new_zeros(*ids.shape, x.shape[-1])
        pairs[tok, slot] = y
        return pairs.float().sum(1).to(x.dtype)


class RowSplitIndexer(Indexer):
    """The replicated indexer that scores only every world-th query row (rank r: rows r, r+N, ...: causal work
    stays balanced) against all keys, then all-gathers the top-k, so prefill does not repeat it on every rank."""

    def __init__(self, base: Indexer, ctx: ParallelContext):
        nn.Module.__init__(self)
        self.n_heads, self.head_dim, self.rope_dim = base.n_heads, base.head_dim, base.rope_dim
        self.topk, self.rope_interleaved = base.topk, base.rope_interleaved
        self.wq_b, self.wk, self.k_norm, self.weights_proj = base.wq_b, base.wk, base.k_norm, base.weights_proj
        self.ctx = ctx

    def forward(self, x, q_resid, cos, sin, positions: torch.Tensor, pool: torch.Tensor | None = None,
                publish: int | None = None):
        """As ``Indexer.forward`` (re-rank ``pool`` and ``publish`` included), each rank on its rows."""
        T = x.shape[1]
        rows = strided_rows(T, self.ctx, x.device)
        q, _, w = self.project(x[:, rows], q_resid[:, rows], cos[:, rows], sin[:, rows])
        s = self.scores(q, self._keys(x, cos, sin), w)
        valid = causal_mask(positions[:, rows], positions)
        if pool is not None:
            valid = valid & pool_mask(pool[:, rows], s.shape[-1])
        gather = lambda t: gather_strided(t.transpose(0, 1).contiguous(), T, self.ctx).transpose(0, 1)  # noqa: E731
        top = gather(select_topk(s, valid, self.topk))  # [B, T, k] from [B, per, k] on each rank
        if publish:
            return Selection(top, gather(select_topk(s, valid, publish)))
        return top

    def _keys(self, x, cos, sin):
        k = self.k_norm(self.wk(x))
        r = self.rope_dim
        return torch.cat([apply_rope(k[..., :r], cos, sin, self.rope_interleaved), k[..., r:]], -1)
