"""Weight bytes of a model from its config alone (no tensors built), bf16 or FP8, per GPU under tensor
parallelism, for ``indexcache info``.

FP8 follows model/linear.py: q_a, q_b, kv_a, o_proj, the dense MLPs, shared and routed experts are fp8 e4m3 (1 B)
plus an fp32 scale per 128x128 block; embeddings, LM head, kv_b_proj (W_UK/W_UV), the indexer, norms and the
router stay 2 B (indexer weights_proj: 4 B, kept fp32).
Tensor parallelism over ``tp`` GPUs (an assumption about how a serving stack splits the model, stated so the
numbers can be read): per-head and per-channel weights divide by tp (q_b, kv_b, o_proj, dense MLPs, shared
experts, routed experts by expert or channel, the embedding and LM head by vocabulary); q_a, kv_a, the indexer,
norms and the router are replicated on every GPU. The MLA latent cache is replicated too (all heads read the same
latent row), so cache bytes per token per GPU do not shrink with tp.
"""
from __future__ import annotations

from ..config import ModelConfig

H200_BYTES = 140 * 2**30  # what torch reports as an H200's total memory (141 GB marketed)


def _b(n: int) -> int:
    return -(-n // 128)


def _mat(rows: int, cols: int, fp8: bool) -> int:
    return rows * cols + 4 * _b(rows) * _b(cols) if fp8 else 2 * rows * cols


def weight_bytes_per_gpu(cfg: ModelConfig, fp8: bool, tp: int = 1) -> dict:
    """{"split": bytes divided over the tp GPUs, "replicated": bytes every GPU holds, "per_gpu", "total"}."""
    if tp < 1:
        raise ValueError(f"tp must be >= 1, got {tp}")
    D, h = cfg.hidden_size, cfg.num_heads
    split = rep = 0
    split += 2 * cfg.vocab_size * D * (1 if cfg.tie_word_embeddings else 2) + 2 * D  # embed, head, final norm
    for layer in range(cfg.num_layers):
        rep += _mat(cfg.q_lora_rank, D, fp8) + _mat(cfg.kv_lora_rank + cfg.qk_rope_head_dim, D, fp8)
        rep += 2 * (cfg.q_lora_rank + cfg.kv_lora_rank + 2 * D)  # four norms
        split += _mat(h * cfg.qk_head_dim, cfg.q_lora_rank, fp8) + _mat(D, h * cfg.v_head_dim, fp8)
        split += 2 * cfg.kv_lora_rank * h * (cfg.qk_nope_head_dim + cfg.v_head_dim)  # kv_b: kept bf16
        if cfg.pattern.has_indexer(layer):  # F and R layers hold indexer weights
            rep += 2 * (cfg.q_lora_rank * cfg.index_n_heads * cfg.index_head_dim + D * cfg.index_head_dim
                        + 2 * cfg.index_head_dim) + 4 * D * cfg.index_n_heads
        if cfg.mlp_layer_types[layer] == "dense":
            split += 3 * _mat(cfg.intermediate_size, D, fp8)
        else:
            inter = cfg.moe_intermediate_size
            rep += 2 * cfg.n_routed_experts * D + 4 * cfg.n_routed_experts  # router + correction bias
            split += (cfg.n_routed_experts + cfg.n_shared_experts) * 3 * _mat(inter, D, fp8)
    return {"split": split, "replicated": rep, "per_gpu": split // tp + rep, "total": split + rep}


def memory_lines(cfg: ModelConfig, weight_dtypes: list[str], tp: int, cache_bytes_per_token: int,
                 gpu_bytes: int) -> list[str]:
    """Weight and cache bytes per GPU for each weight dtype, and how many tokens of cache the rest holds."""
    lines = []
    for wd in weight_dtypes:
        w = weight_bytes_per_gpu(cfg, wd == "fp8", tp)
        free = gpu_bytes - w["per_gpu"]
        fits = (f"fits: {free / 2**30:.0f} GiB left, at most {free // cache_bytes_per_token:,} tokens of cache per GPU"
                if free > 0 else f"does NOT fit ({-free / 2**30:.0f} GiB short)")
        lines.append(f"{wd} weights: {w['total'] / 1e9:.1f} GB in all; {w['per_gpu'] / 2**30:.1f} GiB per GPU at "
                     f"tp={tp} on {gpu_bytes / 2**30:.0f} GiB GPUs: {fits}")
    lines.append(f"cache: {cache_bytes_per_token:,} B per token per GPU (the MLA latent is replicated under TP); "
                 f"TP splits heads, experts, MLPs and vocabulary, and replicates q_a/kv_a, the indexer, norms and "
                 f"the router")
    return lines
