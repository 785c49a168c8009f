"""The plain-PyTorch pieces of a layer between the attention backend's kernels: norms, projections with RoPE,
the output projection and the MLP/MoE. Decode runs them torch.compile'd (``compile_glue``); prefill runs its own
form (``prefill_glue``), whose activations are large enough that every extra pass over them shows."""
from __future__ import annotations

import functools

import torch

from ..kernels.rms_norm import rms_norm, rms_norm_reference
from ..kernels.rope import rope, rope_reference
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


# ----- prefill -------------------------------------------------------------------------------------------------
# The same maths as the glue above, written so that a [T, ...] activation is read and written as few times as
# possible: the residual add rides in the next RMSNorm's pass (kernels.rms_norm: fp32 statistics in one launch
# instead of ~8 elementwise passes), the absorbed query [T, h, kv_lora + rope] is written in place by the W_UK
# GEMM and the RoPE kernel (no concatenation), RoPE rotates the indexer's q and k in place, and W_UV writes the
# heads in o_proj's [T, h * v] layout (no transposing copy). ``fused``: the Triton kernels (CUDA); else their
# PyTorch references, op for op the decode glue's maths.

def _norm(norm, x, fused, residual=None):
    return (rms_norm if fused else rms_norm_reference)(x, norm.weight, norm.eps, residual=residual)


def _rope_into(x, cos, sin, interleaved, out, fused):
    """x [T, H, R] rotated into ``out`` (a slice of a wider buffer, or x itself)."""
    if fused:
        return rope(x, cos, sin, interleaved, out=out)
    return out.copy_(rope_reference(x, cos[:, None], sin[:, None], interleaved))


def _prefill_pre_attention(layer, h, pending, cos, sin, w_uk, w_x, splits, *, fused):
    """``_pre_attention`` for prefill. ``pending``: the previous layer's MLP output, added to the residual stream
    ``h`` here in the input norm's pass (None on the first layer). cos/sin [T, rope/2].
    Returns (h, x, q [T, h, kv_lora + rope], q_resid, c_kv, k_pe, index_pre)."""
    attn = layer.self_attn
    cfg = attn.cfg
    if pending is None:
        x = _norm(layer.input_layernorm, h, fused)
    else:
        x, h = _norm(layer.input_layernorm, pending, fused, residual=h)
    parts = (w_x(x) if isinstance(w_x, torch.nn.Module) else torch.nn.functional.linear(x, w_x)).split(splits, dim=-1)
    T, H = x.shape[0], attn.num_local_heads
    q_resid = _norm(attn.q_a_layernorm, parts[0], fused)
    c_kv, k_pe = parts[1].split([cfg.kv_lora_rank, cfg.qk_rope_head_dim], dim=-1)
    c_kv = _norm(attn.kv_a_layernorm, c_kv, fused)
    k_pe = _rope_into(k_pe[:, None], cos, sin, cfg.mla_rope_interleaved,
                      torch.empty(T, 1, cfg.qk_rope_head_dim, dtype=k_pe.dtype, device=x.device), fused)[:, 0]
    qb = attn.q_b_proj(q_resid).view(T, H, cfg.qk_head_dim)
    q = torch.empty(T, H, cfg.kv_lora_rank + cfg.qk_rope_head_dim, dtype=qb.dtype, device=x.device)
    torch.bmm(qb[..., :cfg.qk_nope_head_dim].transpose(0, 1), w_uk, out=q[..., :cfg.kv_lora_rank].transpose(0, 1))
    _rope_into(qb[..., cfg.qk_nope_head_dim:], cos, sin, cfg.mla_rope_interleaved, q[..., cfg.kv_lora_rank:], fused)
    index_pre = (parts[2], parts[3] if len(parts) > 3 else None) if len(parts) > 2 else None
    return h, x, q, q_resid, c_kv, k_pe, index_pre


def _prefill_index_projection(indexer, x, q_resid, cos, sin, pre=None, *, fused):
    """``Indexer.project`` for prefill rows: q [T, H, D], k [T, D] rotated in place, w [T, H] fp32."""
    T = x.shape[0]
    q = indexer.wq_b(q_resid).view(T, indexer.n_heads, indexer.head_dim)
    k_lin, w_lin = pre if pre is not None else (indexer.wk(x), None)
    if w_lin is None:
        w_lin = indexer.weights_proj(x.to(indexer.weights_proj.weight.dtype))
    k = indexer.k_norm(k_lin)
    r, il = indexer.rope_dim, indexer.rope_interleaved
    _rope_into(q[..., :r], cos, sin, il, q[..., :r], fused)
    _rope_into(k[:, None, :r], cos, sin, il, k[:, None, :r], fused)
    return q, k, w_lin.float() * indexer.n_heads ** -0.5


def _prefill_attention_out(attn, o_lat, w_uv):
    """o_proj(W_UV o_lat): the attention output, not yet added to the stream (the next norm adds it)."""
    T, H = o_lat.shape[:2]
    o = torch.empty(T, H, w_uv.shape[1], dtype=o_lat.dtype, device=o_lat.device)
    torch.bmm(o_lat.transpose(0, 1), w_uv.transpose(1, 2), out=o.transpose(0, 1))
    return attn.o_proj(o.view(T, -1))


def _prefill_ffn(layer, h, a, moe_small_batch_kernel: bool, *, fused):
    """(h + a, MLP(norm(h + a))): the MLP output is returned apart, for the next layer's input norm to add."""
    x, h = _norm(layer.post_attention_layernorm, a, fused, residual=h)
    if isinstance(layer.mlp, MoE):
        return h, layer.mlp(x, small_batch_kernel=moe_small_batch_kernel)
    return h, layer.mlp(x)


def prefill_glue(fused: bool) -> dict:
    """The prefill glue; ``fused``: with the Triton norm and RoPE kernels (CUDA), else their PyTorch references."""
    return {"pre": functools.partial(_prefill_pre_attention, fused=fused),
            "index_proj": functools.partial(_prefill_index_projection, fused=fused),
            "attn_out": _prefill_attention_out, "ffn": functools.partial(_prefill_ffn, fused=fused)}


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
