"""FP8 weights: ``Fp8Linear`` (fp8 e4m3 weight + 128x128 ``weight_scale_inv``, DeepSeek's checkpoint format) and
the choice of which weights a model keeps in FP8.

FP8 (what the DeepSeek/GLM checkpoints quantise, and where the bytes and FLOPs are): the MLA projections q_a, q_b,
kv_a and o_proj, the dense MLPs, the shared experts and the routed experts.
Kept in the model's dtype (bf16 on a GPU). In an FP8 model they are 1.1% of DeepSeek-V3.2's and GLM-5's bytes
and 6.5% of glm-4.7-flash-dsa's; FP8 would save 3.5 / 3.5 / 0.9 GiB (``benchmarks/fp8_weights.py``, kept_bf16):
- embeddings and the LM head (0.5% of DeepSeek-V3.2 in FP8): a lookup, and one GEMM on the last token per
  sequence; its logits drive sampling, and both families ship them unquantised;
- kv_b_proj, which becomes the absorbed W_UK / W_UV (0.3%): it is applied per head as batched GEMMs (einsum over
  [h, 128..256, 512]), and torch has no block-scaled batched form; an FP8 checkpoint's kv_b_proj is dequantised
  on load;
- the indexer (wq_b, wk, weights_proj, k_norm; 0.25%): its scores pick the top-k that every later S layer reuses
  (the benchmark measures the top-k overlap with FP8 projections), and its keys are already FP8 in the cache;
- norms, the router (computed in fp32) and the correction bias.
"""
from __future__ import annotations

import torch
from torch import nn

from ..kernels.fp8_linear import (FP8, block_scaled_mm_available, blocks, dequantize_weight, fp8_linear,
                                 quantize_weight)

WEIGHT_DTYPES = ("auto", "fp8", "bf16")
_ATTN_FP8 = ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "o_proj")
_MLP_FP8 = ("gate_proj", "up_proj", "down_proj")


class Fp8Linear(nn.Module):
    """y = x @ W^T with W stored as fp8 e4m3 [out, in] and fp32 ``weight_scale_inv`` [ceil(out/128), ceil(in/128)]
    (buffers: they load from and save to the checkpoint's own names). Output in x's dtype."""

    def __init__(self, in_features: int, out_features: int, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=FP8, device=device))
        self.register_buffer("weight_scale_inv", torch.empty(blocks(out_features), blocks(in_features),
                                                             dtype=torch.float32, device=device))

    @classmethod
    def from_weight(cls, w: torch.Tensor) -> "Fp8Linear":
        """Quantise a [out, in] weight per 128x128 block (random presets, bf16 checkpoints loaded as FP8)."""
        m = cls(w.shape[1], w.shape[0], device=w.device)
        m.weight, m.weight_scale_inv = quantize_weight(w)
        return m

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        return dequantize_weight(self.weight, self.weight_scale_inv, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fp8_linear(x, self.weight, self.weight_scale_inv, out_dtype=x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fp8 e4m3 128x128 blocks"


def fp8_linear_slots(model) -> list[tuple[nn.Module, str]]:
    """(parent module, attribute) of every nn.Linear that an FP8 model keeps in FP8 (see the module docstring)."""
    out = []
    for layer in model.layers:
        out += [(layer.self_attn, n) for n in _ATTN_FP8]
        mlp = layer.mlp
        dense = getattr(mlp, "shared_experts", mlp)
        out += [(dense, n) for n in _MLP_FP8]
    return out


def use_fp8_storage(model, *, quantize: bool) -> None:
    """Make ``model`` an FP8 model in place. ``quantize``: quantise its current weights per 128x128 block (random
    presets); otherwise allocate empty FP8 storage on the model's device (a checkpoint fills it)."""
    for parent, name in fp8_linear_slots(model):
        lin = getattr(parent, name)
        if isinstance(lin, Fp8Linear):
            continue
        if quantize:
            new = Fp8Linear.from_weight(lin.weight.detach())
        else:
            new = Fp8Linear(lin.in_features, lin.out_features, device=lin.weight.device)
        setattr(parent, name, new)  # the bf16 weight is freed here, one module at a time
    for layer in model.layers:
        experts = getattr(layer.mlp, "experts", None)
        if experts is not None and experts.gate_up.dtype != FP8:
            experts.use_fp8_storage(quantize=quantize)


def use_dequantized_storage(model, dtype: torch.dtype) -> None:
    """The inverse of ``use_fp8_storage``: FP8 weights dequantised into ``dtype`` parameters in place (the
    "bf16-dequantised" model that FP8 compute is compared against)."""
    for parent, name in fp8_linear_slots(model):
        lin = getattr(parent, name)
        if isinstance(lin, Fp8Linear):
            new = nn.Linear(lin.in_features, lin.out_features, bias=False, device=lin.weight.device, dtype=dtype)
            new.weight.data = lin.dequantized(dtype)
            new.weight.requires_grad_(False)
            setattr(parent, name, new)
    for layer in model.layers:
        experts = getattr(layer.mlp, "experts", None)
        if experts is not None and experts.gate_up.dtype == FP8:
            gu, dn = experts.dequantized(dtype)
            for n in ("gate_up", "gate_up_scale_inv", "down", "down_scale_inv"):
                delattr(experts, n)
            experts.gate_up = nn.Parameter(gu, requires_grad=False)
            experts.down = nn.Parameter(dn, requires_grad=False)


def is_fp8_model(model) -> bool:
    return any(isinstance(m, Fp8Linear) for m in model.modules())


def weight_bytes(model) -> int:
    """Bytes of every parameter and buffer (weights, scales, RoPE tables) the model holds."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


def resolve_weight_dtype(weight_dtype: str, device, checkpoint_is_fp8: bool) -> bool:
    """True when the model should hold FP8 weights. "auto": an FP8 checkpoint stays FP8 on a GPU whose FP8 GEMM
    path exists here (torch's block-scaled scaled_mm: compute capability 9.x), else it is dequantised. "fp8"
    forces FP8 storage (elsewhere the GEMMs dequantise per call: less memory, slower); "bf16" dequantises."""
    if weight_dtype not in WEIGHT_DTYPES:
        raise ValueError(f"weight_dtype must be one of {WEIGHT_DTYPES}, got {weight_dtype!r}")
    if weight_dtype == "auto":
        return checkpoint_is_fp8 and block_scaled_mm_available(device)
    return weight_dtype == "fp8"


class _Concat(nn.Module):
    def __init__(self, mods):
        super().__init__()
        self.mods = nn.ModuleList(mods)

    def forward(self, x):
        return torch.cat([m(x) for m in self.mods], dim=-1)


def fuse_fp8_linears(mods: list[Fp8Linear]) -> nn.Module:
    """One FP8 GEMM for several projections of the same input (rows and block scales concatenated; the modules'
    buffers become views of the fused ones: no extra memory). Block scales cover 128 output rows, so this needs
    every module but the last to have a multiple of 128 outputs (q_a_proj's 768/1536/2048 before kv_a's 576 do);
    otherwise the modules run one after another and their outputs are concatenated."""
    if any(m.out_features % 128 for m in mods[:-1]) or len({m.in_features for m in mods}) != 1:
        return _Concat(mods)
    fused = Fp8Linear(mods[0].in_features, sum(m.out_features for m in mods), device=mods[0].weight.device)
    fused.weight = torch.cat([m.weight for m in mods])
    fused.weight_scale_inv = torch.cat([m.weight_scale_inv for m in mods])
    r = b = 0
    for m in mods:
        nb = blocks(m.out_features)
        m.weight = fused.weight[r:r + m.out_features]
        m.weight_scale_inv = fused.weight_scale_inv[b:b + nb]
        r, b = r + m.out_features, b + nb
    return fused
