"""Built-in model shapes by name, so benchmarks and demos run without a checkpoint.

``glm-4.7-flash-dsa`` is the 30B DSA model of the IndexCache paper: GLM-4.7-Flash's dimensions (47 layers, hidden
2048, 20 heads, MoE 64 experts top-4 + 1 shared). The paper does not state its indexer size; we ASSUME the GLM-5
family's 32 heads x 128 with top-k 2048 (GLM-5's indexer; the paper uses k = 2048 throughout).
"""
from __future__ import annotations

from .config import ConfigError, ModelConfig

_PRESETS: dict[str, dict] = {
    "deepseek-v3.2": dict(
        model_type="deepseek_v32", vocab_size=129280, hidden_size=7168, intermediate_size=18432,
        moe_intermediate_size=2048, num_hidden_layers=61, num_attention_heads=128, q_lora_rank=1536,
        kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=256,
        n_shared_experts=1, num_experts_per_tok=8, n_group=8, topk_group=4, routed_scaling_factor=2.5,
        first_k_dense_replace=3, index_n_heads=64, index_head_dim=128, index_topk=2048,
        rope_theta=10000.0, rope_scaling=dict(type="yarn", factor=40, original_max_position_embeddings=4096,
                                              beta_fast=32, beta_slow=1, mscale=1.0, mscale_all_dim=1.0),
        max_position_embeddings=163840, rms_norm_eps=1e-6, bos_token_id=0, eos_token_id=1),
    "glm-5": dict(
        model_type="glm_moe_dsa", vocab_size=154880, hidden_size=6144, intermediate_size=12288,
        moe_intermediate_size=2048, num_hidden_layers=78, num_attention_heads=64, q_lora_rank=2048,
        kv_lora_rank=512, qk_nope_head_dim=192, qk_rope_head_dim=64, v_head_dim=256, n_routed_experts=256,
        n_shared_experts=1, num_experts_per_tok=8, n_group=1, topk_group=1, routed_scaling_factor=2.5,
        first_k_dense_replace=3, index_n_heads=32, index_head_dim=128, index_topk=2048, rope_theta=1e6,
        max_position_embeddings=202752, rms_norm_eps=1e-5),
    "glm-4.7-flash-dsa": dict(
        model_type="glm_moe_dsa", vocab_size=154880, hidden_size=2048, intermediate_size=10240,
        moe_intermediate_size=1536, num_hidden_layers=47, num_attention_heads=20, q_lora_rank=768,
        kv_lora_rank=512, qk_nope_head_dim=192, qk_rope_head_dim=64, v_head_dim=256, n_routed_experts=64,
        n_shared_experts=1, num_experts_per_tok=4, n_group=1, topk_group=1, routed_scaling_factor=1.8,
        first_k_dense_replace=1, index_n_heads=32, index_head_dim=128, index_topk=2048, rope_theta=1e6,
        max_position_embeddings=202752, rms_norm_eps=1e-5),
    # Small enough for the CPU demo and tests; top-k far below the demo length so selection matters.
    "tiny": dict(
        model_type="glm_moe_dsa", vocab_size=512, hidden_size=128, intermediate_size=256, moe_intermediate_size=64,
        num_hidden_layers=8, num_attention_heads=4, q_lora_rank=64, kv_lora_rank=64, qk_nope_head_dim=32,
        qk_rope_head_dim=16, v_head_dim=32, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
        n_group=1, topk_group=1, routed_scaling_factor=1.5, first_k_dense_replace=1, index_n_heads=4,
        index_head_dim=32, index_topk=32, rope_theta=10000.0, max_position_embeddings=4096, rms_norm_eps=1e-5),
}


def preset_names() -> list[str]:
    return sorted(_PRESETS)


def preset_hf_dict(name: str) -> dict:
    try:
        return dict(_PRESETS[name])
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; available: {', '.join(preset_names())}") from None


def preset_config(name: str) -> ModelConfig:
    return ModelConfig.from_hf_dict(preset_hf_dict(name), name=name)
