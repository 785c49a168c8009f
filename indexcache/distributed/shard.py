"""``shard_model(model, ctx)``: turn a built DSAModel into this rank's shard of it, in place.

The model stays a plain nn.Module: parameters are sliced by the plan (plan.py), three kinds of module are swapped
for their parallel forms (layers.py), and row-parallel outputs get one all-reduce through a forward hook (o_proj,
each dense MLP, each MoE: routed and shared experts are summed first, then reduced once). Works on a meta-device
model too, which is how ``load_sharded`` builds a rank's shard without ever holding the full weights.
"""
from __future__ import annotations

import torch
from torch import nn

from ..model import DSAModel
from ..model.linear import use_fp8_storage
from ..model.moe import MoE
from .comm import all_reduce_
from .context import ParallelContext, ParallelError
from .layers import ExpertParallelExperts, RowSplitIndexer, VocabParallelEmbedding, VocabParallelLMHead
from .plan import check_divisible, local_experts, param_shard


def shard_model(model: DSAModel, ctx: ParallelContext) -> DSAModel:
    if getattr(model, "parallel", None) is not None:
        raise ParallelError("this model is sharded already")
    cfg = model.config
    check_divisible(cfg, ctx)
    model.parallel = ctx
    if ctx.is_single:
        return model
    with torch.no_grad():
        for name, p in list(model.named_parameters()):
            shard = param_shard(name, cfg, ctx)
            if shard is not None and name not in ("embed_tokens.weight", "lm_head.weight"):
                _set_param(model, name, shard.apply(p.data).contiguous(), p.requires_grad)
        v0, _, per = ctx.padded_range(cfg.vocab_size)
        emb = param_shard("embed_tokens.weight", cfg, ctx).apply(model.embed_tokens.weight.data).contiguous()
        model.embed_tokens = VocabParallelEmbedding(emb, v0, cfg.vocab_size, ctx)
        if cfg.tie_word_embeddings:
            head = model.embed_tokens.weight
        else:
            head = param_shard("lm_head.weight", cfg, ctx).apply(model.lm_head.weight.data).contiguous()
        model.lm_head = VocabParallelLMHead(head, per, cfg.vocab_size, ctx)

    heads = cfg.num_heads // ctx.world_size
    for layer in model.layers:
        attn = layer.self_attn
        attn.num_local_heads = heads
        if attn.indexer is not None:
            attn.indexer = RowSplitIndexer(attn.indexer, ctx)
        mlp = layer.mlp
        if isinstance(mlp, MoE):
            ex = mlp.experts
            if ctx.expert_parallel:
                first, _ = local_experts(cfg, ctx)
                mlp.experts = ExpertParallelExperts(ex.gate_up.data, ex.down.data, ex.inter, first)
            else:
                ex.inter = ex.gate_up.shape[1] // 2
    add_reductions(model)
    return model


def add_reductions(model: DSAModel) -> None:
    """The all-reduce hooks on the row-parallel outputs (each o_proj, each dense MLP or MoE), added where missing:
    run it again after swapping any of those modules (``use_fp8_shard_storage`` does)."""
    ctx = model.parallel
    for layer in model.layers:
        for mod in (layer.self_attn.o_proj, layer.mlp):
            if not getattr(mod, "_tp_all_reduce", False):
                mod.register_forward_hook(_reducer(ctx))
                mod._tp_all_reduce = True


def use_fp8_shard_storage(model: DSAModel, *, quantize: bool) -> DSAModel:
    """FP8 storage (model.linear.use_fp8_storage) for a shard: the swapped linears keep their all-reduce."""
    use_fp8_storage(model, quantize=quantize)
    if model.parallel is not None and not model.parallel.is_single:
        add_reductions(model)
    return model


def _reducer(ctx: ParallelContext):
    def hook(module, args, out):
        return all_reduce_(out, ctx)
    return hook


def _set_param(model: nn.Module, name: str, value: torch.Tensor, requires_grad: bool) -> None:
    owner, _, attr = name.rpartition(".")
    mod = model.get_submodule(owner)
    setattr(mod, attr, nn.Parameter(value, requires_grad=requires_grad))
    if isinstance(mod, nn.Linear):  # FP8 conversion and reprs read these
        mod.out_features, mod.in_features = value.shape
