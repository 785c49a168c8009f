"""The model configuration: read once from a checkpoint's config.json into a frozen dataclass.

transformers stays at the edge: we read the two DSA families' config.json keys ourselves
(``deepseek_v32`` / DeepseekV32ForCausalLM and ``glm_moe_dsa`` / GlmMoeDsaForCausalLM).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field

from .pattern import IndexPattern, PatternError

FAMILIES = {"deepseek_v32": "DeepseekV32ForCausalLM", "glm_moe_dsa": "GlmMoeDsaForCausalLM"}
# keys that set weight shapes: a config.json without them is an error, never a silent GLM-5 / DeepSeek default
REQUIRED_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
                 "index_n_heads", "index_head_dim", "index_topk")
MOE_REQUIRED_KEYS = ("moe_intermediate_size", "n_routed_experts", "num_experts_per_tok")  # with any MoE layer
NULLABLE_KEYS = ("q_lora_rank",)  # null = no query compression


class ConfigError(ValueError):
    """A config.json that this library cannot run, with the offending key named."""


@dataclass(frozen=True)
class RopeScaling:
    """YaRN parameters (the only scaling the DSA families use)."""

    factor: float
    original_max_position_embeddings: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 0.0
    attention_factor: float | None = None
    truncate: bool = True


@dataclass(frozen=True)
class ModelConfig:
    family: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    moe_intermediate_size: int
    num_layers: int
    num_heads: int
    q_lora_rank: int
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    # moe
    n_routed_experts: int
    n_shared_experts: int
    num_experts_per_tok: int
    n_group: int
    topk_group: int
    routed_scaling_factor: float
    norm_topk_prob: bool
    mlp_layer_types: tuple[str, ...]
    # index
    index_n_heads: int
    index_head_dim: int
    index_topk: int
    pattern: IndexPattern
    # rope: layouts are explicit (DeepSeek-V3.2: interleaved MLA, half-split indexer; GLM-5: interleaved both)
    rope_theta: float
    rope_scaling: RopeScaling | None
    mla_rope_interleaved: bool
    indexer_rope_interleaved: bool
    max_position_embeddings: int
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 1
    # block-quantised FP8 weights in the checkpoint (dequantised on load)
    fp8_block_size: tuple[int, int] | None = None
    name: str = field(default="", compare=False)

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ConfigError(f"model_type {self.family!r} is not a DSA family; expected one of {sorted(FAMILIES)}")
        positive = ["vocab_size", "hidden_size", "num_layers", "num_heads", "kv_lora_rank", "qk_rope_head_dim",
                    "v_head_dim", "index_n_heads", "index_head_dim", "index_topk"]
        for key in positive:
            v = getattr(self, key)
            if not isinstance(v, int) or v < 1:
                raise ConfigError(f"{key} must be a positive integer, got {v!r}")
        if not self.q_lora_rank or self.q_lora_rank < 1:
            raise ConfigError(f"q_lora_rank must be set (DSA indexers read the q LoRA latent), got {self.q_lora_rank!r}")
        if self.index_head_dim < self.qk_rope_head_dim:
            raise ConfigError(f"index_head_dim ({self.index_head_dim}) must be >= qk_rope_head_dim "
                              f"({self.qk_rope_head_dim}): the indexer applies RoPE to its first rope dims")
        if len(self.mlp_layer_types) != self.num_layers:
            raise ConfigError(f"mlp_layer_types has {len(self.mlp_layer_types)} entries for {self.num_layers} layers")
        bad = [t for t in self.mlp_layer_types if t not in ("dense", "sparse")]
        if bad:
            raise ConfigError(f"mlp_layer_types may contain 'dense' and 'sparse' only, found {bad[0]!r}")
        if "sparse" in self.mlp_layer_types:
            if self.n_routed_experts % self.n_group:
                raise ConfigError(f"n_routed_experts ({self.n_routed_experts}) must be divisible by n_group "
                                  f"({self.n_group})")
            if not 1 <= self.topk_group <= self.n_group:
                raise ConfigError(f"topk_group must be in [1, n_group={self.n_group}], got {self.topk_group}")
            if not 1 <= self.num_experts_per_tok <= self.n_routed_experts:
                raise ConfigError(f"num_experts_per_tok must be in [1, {self.n_routed_experts}], "
                                  f"got {self.num_experts_per_tok}")
        if len(self.pattern) != self.num_layers:
            raise PatternError(f"index pattern {self.pattern} has {len(self.pattern)} layers, model has "
                               f"{self.num_layers}")

    # ----- derived values -------------------------------------------------------------------------------------
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def softmax_scale(self) -> float:
        """1/sqrt(qk_head_dim), times YaRN's mscale^2 when mscale_all_dim is set (DeepSeek-V3.2: 0.13523)."""
        scale = self.qk_head_dim ** -0.5
        rs = self.rope_scaling
        if rs is not None and rs.mscale_all_dim:
            m = _yarn_mscale(rs.factor, rs.mscale_all_dim)
            scale = scale * m * m
        return scale

    @property
    def indexer_params_per_layer(self) -> int:
        """Parameters of one layer's indexer (wq_b, wk, k_norm weight+bias, weights_proj)."""
        return (self.q_lora_rank * self.index_n_heads * self.index_head_dim + self.hidden_size * self.index_head_dim
                + 2 * self.index_head_dim + self.hidden_size * self.index_n_heads)

    def with_pattern(self, spec) -> "ModelConfig":
        return dataclasses.replace(self, pattern=IndexPattern.parse(spec, self.num_layers))

    def replace(self, **changes) -> "ModelConfig":
        if "num_layers" in changes and "pattern" not in changes:
            changes["pattern"] = IndexPattern.all_full(changes["num_layers"])
        if "num_layers" in changes and "mlp_layer_types" not in changes:
            n_dense = self.mlp_layer_types.count("dense")
            changes["mlp_layer_types"] = _mlp_types(changes["num_layers"], n_dense)
        return dataclasses.replace(self, **changes)

    # ----- reading and writing config.json ---------------------------------------------------------------------
    @classmethod
    def from_hf_dict(cls, d: dict, *, name: str = "") -> "ModelConfig":
        family = d.get("model_type")
        if family not in FAMILIES:
            raise ConfigError(f"config.json model_type {family!r} is not supported; expected one of {sorted(FAMILIES)}")
        glm = family == "glm_moe_dsa"
        defaults = _GLM5_DEFAULTS if glm else _DSV32_DEFAULTS

        def get(key):
            return d[key] if d.get(key) is not None else defaults[key]

        def missing(keys):
            return [k for k in keys if k not in d or (d[k] is None and k not in NULLABLE_KEYS)]

        absent = missing(REQUIRED_KEYS)
        num_layers = _int(get("num_hidden_layers"), "num_hidden_layers")
        mlp_types = d.get("mlp_layer_types")
        if mlp_types is None:
            mlp_types = _mlp_types(num_layers, _int(get("first_k_dense_replace"), "first_k_dense_replace"))
        if "sparse" in mlp_types:
            absent += missing(MOE_REQUIRED_KEYS)
        if absent:
            raise ConfigError(f"config.json is missing required key{'s' if len(absent) > 1 else ''} "
                              f"{', '.join(absent)} (they set the weight shapes of a {family} model)")
        rope_theta, rope_scaling = _read_rope(d, defaults)
        quant = d.get("quantization_config") or {}
        fp8_block = None
        if quant:
            if quant.get("quant_method") != "fp8":
                raise ConfigError(f"quantization_config.quant_method {quant.get('quant_method')!r} is not supported "
                                  "(only DeepSeek-style 'fp8' block quantisation)")
            fp8_block = tuple(quant.get("weight_block_size") or (128, 128))
        return cls(
            family=family,
            vocab_size=_int(get("vocab_size"), "vocab_size"),
            hidden_size=_int(get("hidden_size"), "hidden_size"),
            intermediate_size=_int(get("intermediate_size"), "intermediate_size"),
            moe_intermediate_size=_int(get("moe_intermediate_size"), "moe_intermediate_size"),
            num_layers=num_layers,
            num_heads=_int(get("num_attention_heads"), "num_attention_heads"),
            q_lora_rank=None if d.get("q_lora_rank") is None else _int(d["q_lora_rank"], "q_lora_rank"),
            kv_lora_rank=_int(get("kv_lora_rank"), "kv_lora_rank"),
            qk_nope_head_dim=_int(get("qk_nope_head_dim"), "qk_nope_head_dim"),
            qk_rope_head_dim=_int(get("qk_rope_head_dim"), "qk_rope_head_dim"),
            v_head_dim=_int(get("v_head_dim"), "v_head_dim"),
            n_routed_experts=_int(get("n_routed_experts"), "n_routed_experts"),
            n_shared_experts=_int(get("n_shared_experts"), "n_shared_experts"),
            num_experts_per_tok=_int(get("num_experts_per_tok"), "num_experts_per_tok"),
            n_group=_int(get("n_group"), "n_group"),
            topk_group=_int(get("topk_group"), "topk_group"),
            routed_scaling_factor=_float(get("routed_scaling_factor"), "routed_scaling_factor"),
            norm_topk_prob=bool(get("norm_topk_prob")),
            mlp_layer_types=tuple(mlp_types),
            index_n_heads=_int(get("index_n_heads"), "index_n_heads"),
            index_head_dim=_int(get("index_head_dim"), "index_head_dim"),
            index_topk=_int(get("index_topk"), "index_topk"),
            pattern=IndexPattern.from_hf_config(d, num_layers),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            mla_rope_interleaved=bool(d.get("rope_interleave", True)),
            indexer_rope_interleaved=bool(d.get("indexer_rope_interleave", glm)),
            max_position_embeddings=_int(get("max_position_embeddings"), "max_position_embeddings"),
            rms_norm_eps=_float(get("rms_norm_eps"), "rms_norm_eps"),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            bos_token_id=d.get("bos_token_id", 0),
            eos_token_id=d.get("eos_token_id", 1),
            fp8_block_size=fp8_block,
            name=name,
        )

    @classmethod
    def from_checkpoint(cls, path: str) -> "ModelConfig":
        cfg_path = os.path.join(path, "config.json")
        if not os.path.isfile(cfg_path):
            raise ConfigError(f"no config.json in checkpoint folder {path!r}")
        with open(cfg_path) as f:
            try:
                d = json.load(f)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{cfg_path} is not valid JSON: {e}") from e
        if not isinstance(d, dict):
            raise ConfigError(f"{cfg_path} holds a {type(d).__name__}, not a JSON object")
        try:
            return cls.from_hf_dict(d, name=os.path.basename(os.path.normpath(path)))
        except ConfigError as e:
            raise ConfigError(f"{cfg_path}: {e}") from e

    def to_hf_dict(self) -> dict:
        """A config.json that transformers and this library both read (pattern written as the GLM keys)."""
        rope = {"rope_theta": self.rope_theta, "rope_type": "default"}
        if self.rope_scaling is not None:
            rs = self.rope_scaling
            rope = {"rope_theta": self.rope_theta, "rope_type": "yarn", "factor": rs.factor,
                    "original_max_position_embeddings": rs.original_max_position_embeddings,
                    "beta_fast": rs.beta_fast, "beta_slow": rs.beta_slow, "mscale": rs.mscale,
                    "mscale_all_dim": rs.mscale_all_dim}
            if rs.attention_factor is not None:
                rope["attention_factor"] = rs.attention_factor
        d = {
            "architectures": [FAMILIES[self.family]], "model_type": self.family,
            "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size, "moe_intermediate_size": self.moe_intermediate_size,
            "num_hidden_layers": self.num_layers, "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_heads, "q_lora_rank": self.q_lora_rank,
            "kv_lora_rank": self.kv_lora_rank, "qk_nope_head_dim": self.qk_nope_head_dim,
            "qk_rope_head_dim": self.qk_rope_head_dim, "v_head_dim": self.v_head_dim,
            "n_routed_experts": self.n_routed_experts, "n_shared_experts": self.n_shared_experts,
            "num_experts_per_tok": self.num_experts_per_tok, "n_group": self.n_group,
            "topk_group": self.topk_group, "routed_scaling_factor": self.routed_scaling_factor,
            "norm_topk_prob": self.norm_topk_prob, "mlp_layer_types": list(self.mlp_layer_types),
            "first_k_dense_replace": self.mlp_layer_types.count("dense"),
            "index_n_heads": self.index_n_heads, "index_head_dim": self.index_head_dim,
            "index_topk": self.index_topk, "rope_parameters": rope,
            "rope_interleave": self.mla_rope_interleaved, "indexer_rope_interleave": self.indexer_rope_interleaved,
            "max_position_embeddings": self.max_position_embeddings, "rms_norm_eps": self.rms_norm_eps,
            "tie_word_embeddings": self.tie_word_embeddings, "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id, "hidden_act": "silu", "attention_bias": False,
        }
        if self.pattern.num_full < self.num_layers:
            d["index_topk_pattern"] = str(self.pattern)
            if not self.pattern.has_rerank:  # transformers' indexer_types has no re-rank (R) type
                d["indexer_types"] = self.pattern.indexer_types()
        return d


def _int(v, key: str) -> int:
    if isinstance(v, bool) or not (isinstance(v, int) or (isinstance(v, float) and v.is_integer())):
        raise ConfigError(f"{key} must be an integer, got {v!r}")
    return int(v)


def _float(v, key: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ConfigError(f"{key} must be a finite number, got {v!r}")
    return float(v)


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _mlp_types(num_layers: int, n_dense: int) -> tuple[str, ...]:
    n_dense = min(n_dense, num_layers)
    return ("dense",) * n_dense + ("sparse",) * (num_layers - n_dense)


def _read_rope(d: dict, defaults: dict) -> tuple[float, RopeScaling | None]:
    """Both the new ``rope_parameters`` and the older ``rope_theta`` + ``rope_scaling`` spellings."""
    params = d.get("rope_parameters") or {}
    scaling = d.get("rope_scaling") or {}
    theta = float(params.get("rope_theta", d.get("rope_theta", defaults["rope_theta"])))
    src = params if params.get("rope_type", "default") != "default" else scaling
    kind = src.get("rope_type", src.get("type", "default")) if src else "default"
    if kind in (None, "default"):
        return theta, None
    if kind != "yarn":
        raise ConfigError(f"rope type {kind!r} is not supported (DSA models use 'default' or 'yarn')")
    try:
        rs = RopeScaling(
            factor=float(src["factor"]),
            original_max_position_embeddings=int(src["original_max_position_embeddings"]),
            beta_fast=float(src.get("beta_fast") or 32), beta_slow=float(src.get("beta_slow") or 1),
            mscale=float(src.get("mscale") or 1), mscale_all_dim=float(src.get("mscale_all_dim") or 0),
            attention_factor=src.get("attention_factor"), truncate=bool(src.get("truncate", True)))
    except KeyError as e:
        raise ConfigError(f"yarn rope scaling needs the key {e.args[0]!r}") from e
    return theta, rs


# Defaults of the two families for keys a config.json may omit (transformers' config classes, 5.17).
_DSV32_DEFAULTS = dict(
    vocab_size=129280, hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048, num_hidden_layers=61,
    num_attention_heads=128, q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
    v_head_dim=128, n_routed_experts=256, n_shared_experts=1, num_experts_per_tok=8, n_group=8, topk_group=4,
    routed_scaling_factor=2.5, norm_topk_prob=True, first_k_dense_replace=3, index_n_heads=64, index_head_dim=128,
    index_topk=2048, rope_theta=10000.0, max_position_embeddings=163840, rms_norm_eps=1e-6)
_GLM5_DEFAULTS = dict(
    _DSV32_DEFAULTS, vocab_size=154880, hidden_size=6144, intermediate_size=12288, num_hidden_layers=78,
    num_attention_heads=64, q_lora_rank=2048, qk_nope_head_dim=192, v_head_dim=256, n_group=1, topk_group=1,
    index_n_heads=32, max_position_embeddings=202752, rms_norm_eps=1e-5)
