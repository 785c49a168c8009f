"""The sharding plan: for every parameter of a DSAModel, which slice this rank holds.

One table serves both uses: slicing an already-built full model (``shard_model``) and reading only this rank's bytes
from safetensors (``load_sharded``). A ``Shard`` is a list of [start, stop) ranges along one dimension, concatenated
(the stacked gate|up expert weight needs two ranges under tensor parallelism).

- MLA: q_b_proj and kv_b_proj hold this rank's heads (rows), o_proj the matching input columns (+ one all-reduce).
- Dense MLP and shared experts: gate/up rows and down columns of the intermediate dim (+ one all-reduce per FFN).
- Routed experts: TP splits each expert's intermediate dim like the MLP; EP gives each rank E/N whole experts.
- Embedding and LM head: vocabulary rows in chunks of ceil(V/N).
- Everything else (q_a/kv_a projections, norms, the router, the whole indexer) is replicated.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from ..config import ModelConfig
from .context import ParallelContext, ParallelError


@dataclass(frozen=True)
class Shard:
    dim: int
    ranges: tuple[tuple[int, int], ...]

    @property
    def size(self) -> int:
        return sum(b - a for a, b in self.ranges)

    def apply(self, t: torch.Tensor) -> torch.Tensor:
        parts = [t.narrow(self.dim, a, b - a) for a, b in self.ranges]
        return parts[0] if len(parts) == 1 else torch.cat(parts, self.dim)


_ATTN = re.compile(r"^layers\.(\d+)\.self_attn\.(q_b_proj|kv_b_proj|o_proj)\.weight$")
_FFN = re.compile(r"^layers\.(\d+)\.mlp\.(?:shared_experts\.)?(gate_proj|up_proj|down_proj)\.weight$")
_EXPERTS = re.compile(r"^layers\.(\d+)\.mlp\.experts\.(gate_up|down)$")


def check_divisible(cfg: ModelConfig, ctx: ParallelContext) -> None:
    """Every split of the plan is even (except the vocabulary); one clear error otherwise."""
    if ctx.is_single:
        return
    ctx.even_range(cfg.num_heads, "num_attention_heads")
    if "dense" in cfg.mlp_layer_types:
        ctx.even_range(cfg.intermediate_size, "intermediate_size")
    if "sparse" in cfg.mlp_layer_types:
        ctx.even_range(cfg.moe_intermediate_size * cfg.n_shared_experts, "shared experts' intermediate size")
        if ctx.expert_parallel:
            ctx.even_range(cfg.n_routed_experts, "n_routed_experts (expert parallel)")
        else:
            ctx.even_range(cfg.moe_intermediate_size, "moe_intermediate_size")


def param_shard(name: str, cfg: ModelConfig, ctx: ParallelContext) -> Shard | None:
    """This rank's slice of parameter ``name`` (a DSAModel name), or None when it is replicated."""
    if ctx.is_single:
        return None
    m = _ATTN.match(name)
    if m:
        h0, h1 = ctx.even_range(cfg.num_heads, "num_attention_heads")
        per_head = {"q_b_proj": cfg.qk_head_dim, "kv_b_proj": cfg.qk_nope_head_dim + cfg.v_head_dim,
                    "o_proj": cfg.v_head_dim}[m.group(2)]
        return Shard(1 if m.group(2) == "o_proj" else 0, ((h0 * per_head, h1 * per_head),))
    m = _FFN.match(name)
    if m:
        layer = int(m.group(1))
        if ".shared_experts." in name:
            inter, what = cfg.moe_intermediate_size * cfg.n_shared_experts, "shared experts' intermediate size"
        elif cfg.mlp_layer_types[layer] == "dense":
            inter, what = cfg.intermediate_size, "intermediate_size"
        else:
            return None
        a, b = ctx.even_range(inter, what)
        return Shard(1 if m.group(2) == "down_proj" else 0, ((a, b),))
    m = _EXPERTS.match(name)
    if m:
        if ctx.expert_parallel:
            return Shard(0, (ctx.even_range(cfg.n_routed_experts, "n_routed_experts (expert parallel)"),))
        inter = cfg.moe_intermediate_size
        a, b = ctx.even_range(inter, "moe_intermediate_size")
        if m.group(2) == "down":
            return Shard(2, ((a, b),))
        return Shard(1, ((a, b), (inter + a, inter + b)))
    if name in ("embed_tokens.weight", "lm_head.weight"):
        v0, v1, _ = ctx.padded_range(cfg.vocab_size)
        return Shard(0, ((v0, v1),))
    return None


def local_experts(cfg: ModelConfig, ctx: ParallelContext) -> tuple[int, int]:
    """[first, stop) of the routed experts this rank holds (all of them unless expert parallel)."""
    if ctx.expert_parallel and not ctx.is_single:
        return ctx.even_range(cfg.n_routed_experts, "n_routed_experts (expert parallel)")
    return 0, cfg.n_routed_experts


def communication_bytes_per_token(cfg: ModelConfig, world_size: int, num_full: int | None = None,
                                  act_bytes: int = 2) -> dict:
    """What the plan sends per token at ``world_size`` ranks (activations in ``act_bytes``, top-k in int32).

    ``allreduce_payload``: the summed tensors (embedding, then o_proj and the FFN of every layer, hidden-wide);
    ``allreduce_ring_per_rank``: what each rank sends in a ring all-reduce, 2 (N-1)/N of the payload;
    ``indexer_gather_per_rank``: prefill only, the top-k rows of the other ranks each rank receives (F layers);
    ``logits_gather_per_rank``: per sampled token, the other ranks' vocabulary chunks."""
    n = world_size
    full = cfg.pattern.num_full if num_full is None else num_full
    payload = (1 + 2 * cfg.num_layers) * cfg.hidden_size * act_bytes
    return {"allreduce_payload": payload,
            "allreduce_ring_per_rank": int(payload * 2 * (n - 1) / n),
            "indexer_gather_per_rank": int(full * cfg.index_topk * 4 * (n - 1) / n),
            "logits_gather_per_rank": int(-(-cfg.vocab_size // n) * (n - 1) * act_bytes)}
