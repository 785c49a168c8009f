"""Tiny random checkpoints of the two DSA families, made with transformers (the reference implementation)."""
import torch

TINY_COMMON = dict(
    vocab_size=97, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=5,
    num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1,
    kv_lora_rank=32, q_lora_rank=48, qk_rope_head_dim=8, v_head_dim=16, qk_nope_head_dim=16, index_topk=7,
    index_head_dim=16, index_n_heads=4, first_k_dense_replace=1, routed_scaling_factor=2.0,
)


def hf_model(family: str, seed: int, **overrides):
    """A random transformers DSA model (eager attention, fp32, eval)."""
    import transformers

    kw = dict(TINY_COMMON, **overrides)
    if family == "deepseek_v32":
        kw.setdefault("n_group", 2)
        kw.setdefault("topk_group", 1)
        kw.setdefault("rope_parameters", {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                          "original_max_position_embeddings": 16, "beta_fast": 32, "beta_slow": 1,
                                          "mscale": 1.0, "mscale_all_dim": 1.0})
        cfg = transformers.DeepseekV32Config(**kw)
        cls = transformers.DeepseekV32ForCausalLM
    elif family == "glm_moe_dsa":
        kw.setdefault("n_group", 1)
        kw.setdefault("topk_group", 1)
        cfg = transformers.GlmMoeDsaConfig(**kw)
        cls = transformers.GlmMoeDsaForCausalLM
    else:
        raise ValueError(family)
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = cls(cfg).eval()
    with torch.no_grad():  # make the router's correction bias and norms non-trivial
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
                p.add_(torch.randn_like(p) * 0.1)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(torch.randn_like(b) * 0.05)
    return model


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())
