"""The plain-PyTorch pieces of a layer between the attention backend's kernels: norms, projections with RoPE,
the output projection and the MLP/MoE. Decode runs them torch.compile'd (``compile_glue``)."""
from __future__ import annotations

import functools

import torch

from ..model.linear import Fp8Linear, fuse_fp8_linears
from ..model.moe import MoE


def fuse_x_projections(model, plan) -> list[tuple[torch.Tensor, tuple[int, ...]]]:
    """An explicit step of building an engine (``LLMEngine`` runs it, its docstring says so): in every layer, one
    weight for each projection of the layer input x (q_a, kv_a and, on layers that run their indexer, the
    indexer's wk and weights_proj). At decode each is a small GEMV whose launch and latency cost more than its
    bytes; one GEMM reads them all at once. The modules' weights become views of the fused tensor (no extra
    memory, same values, same requires_grad), so the model's own forward is unchanged. Returns (fused weight, row
    splits) per layer."""
    return [_fuse_layer(layer.self_attn, plan.runs_indexer(i)) for i, layer in enumerate(model.layers)]


def _fuse_layer(attn, with_indexer: bool) -> tuple[torch.Tensor, tuple[int, ...]]:
    if isinstance(attn.q_a_proj, Fp8Linear):
        # FP8 models: q_a and kv_a as one FP8 GEMM (a module, see fuse_fp8_linears); the indexer stays apart (bf16)
        fused = fuse_fp8_linears([attn.q_a_proj, attn.kv_a_proj_with_mqa])
        return fused, (attn.q_a_proj.out_features, attn.kv_a_proj_with_mqa.out_features)
    mods = [attn.q_a_proj, attn.kv_a_proj_with_mqa]
    if with_indexer and attn.indexer is not None:
        mods += [attn.indexer.wk, attn.indexer.weights_proj]
    dtype = attn.q_a_proj.weight.dtype
    mods = [m for m in mods if m.weight.dtype == dtype]  # weights_proj may be kept in fp32: it stays apart
    w = torch.cat([m.weight.detach() for m in mods])
    start = 0
    for m in mods:
        n = m.weight.shape[0]
        m.weight = torch.nn.Parameter(w[start:start + n], requires_grad=m.weight.requires_grad)
        start += n
    return w, tuple(m.weight.shape[0] for m in mods)


def _pre_attention(layer, h, cos, sin, w_uk, w_x, splits):
    """Input norm, MLA projections with RoPE, and the absorbed query [T, h, kv_lora + rope]; also the indexer's
    x-projections (wk(x), weights_proj(x)) on F layers, else None."""
    x = layer.input_layernorm(h)
    parts = (w_x(x) if isinstance(w_x, torch.nn.Module) else torch.nn.functional.linear(x, w_x)).split(splits, dim=-1)
    q_nope, q_pe, q_resid, c_kv, k_pe = layer.self_attn.project(x[None], cos, sin, pre=(parts[0][None], parts[1][None]))
    q = torch.cat([torch.einsum("thd,hdc->thc", q_nope[0], w_uk), q_pe[0]], -1)
    # F layers: wk(x) and, when it was fused (same dtype), weights_proj(x); the indexer computes what is missing
    index_pre = (parts[2][None], parts[3][None] if len(parts) > 3 else None) if len(parts) > 2 else None
    return x, q, q_resid, c_kv[0], k_pe[0], index_pre


def _index_projection(indexer, x, q_resid, cos, sin, pre=None):
    q, k, w = indexer.project(x[None], q_resid, cos, sin, pre=pre)
    return q[0], k[0], w[0]


def _attention_out(attn, h, o_lat, w_uv):
    return h + attn.o_proj(torch.einsum("thc,hdc->thd", o_lat, w_uv).flatten(1))


def _ffn(layer, h, moe_small_batch_kernel: bool):
    x = layer.post_attention_layernorm(h)
    if isinstance(layer.mlp, MoE):
        return h + layer.mlp(x, small_batch_kernel=moe_small_batch_kernel)
    return h + layer.mlp(x)


GLUE = {"pre": _pre_attention, "index_proj": _index_projection, "attn_out": _attention_out, "ffn": _ffn}

# torch._dynamo keeps a bounded number of compiled graphs per function (cache_size_limit, default 8); the glue
# needs one per (layer kind: dense/MoE MLP, with/without indexer) x (CUDA-graph batch bucket).
DYNAMO_CACHE_SIZE_LIMIT = 64
DYNAMO_ACCUMULATED_CACHE_SIZE_LIMIT = 512


@functools.lru_cache(maxsize=None)
def compile_glue(backend: str = "inductor") -> dict:
    """torch.compile'd glue, one compiled graph per (layer kind, batch bucket) shared by all layers of that kind
    (and by every engine in the process: the wrappers are made once per backend).

    Process-wide effect, documented on ``EngineConfig.compile_decode``: torch._dynamo's cache_size_limit and
    accumulated_cache_size_limit are raised to at least DYNAMO_CACHE_SIZE_LIMIT and
    DYNAMO_ACCUMULATED_CACHE_SIZE_LIMIT (never lowered)."""
    import torch._dynamo

    cfg = torch._dynamo.config
    cfg.cache_size_limit = max(cfg.cache_size_limit, DYNAMO_CACHE_SIZE_LIMIT)
    if hasattr(cfg, "accumulated_cache_size_limit"):
        cfg.accumulated_cache_size_limit = max(cfg.accumulated_cache_size_limit, DYNAMO_ACCUMULATED_CACHE_SIZE_LIMIT)
    return {k: torch.compile(f, backend=backend, dynamic=False) for k, f in GLUE.items()}
