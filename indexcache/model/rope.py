"""Rotary position embeddings with the pair layout as an explicit argument.

DeepSeek-V3.2 rotates interleaved pairs (2i, 2i+1) in MLA and half-split pairs (i, i+d/2) in the indexer; GLM-5
uses interleaved pairs in both. Interleaved inputs come out de-interleaved ([evens rotated | odds rotated], as in
transformers): q and k get the same permutation, so their dot products equal the interleaved rotation's.
"""
from __future__ import annotations

import math

import torch

from ..config import ModelConfig
from ..kernels.rope import rope_reference


def rope_inv_freq(cfg: ModelConfig) -> tuple[torch.Tensor, float]:
    """Inverse frequencies of the rope dims and the cos/sin scale (YaRN's attention factor, else 1)."""
    dim, base = cfg.qk_rope_head_dim, cfg.rope_theta
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    rs = cfg.rope_scaling
    if rs is None:
        return 1.0 / pos_freqs, 1.0
    factor = rs.factor

    def mscale(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    if rs.attention_factor is not None:
        attention_factor = float(rs.attention_factor)
    elif rs.mscale and rs.mscale_all_dim:
        attention_factor = mscale(factor, rs.mscale) / mscale(factor, rs.mscale_all_dim)
    else:
        attention_factor = mscale(factor)

    def correction_dim(rotations):
        return dim * math.log(rs.original_max_position_embeddings / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(rs.beta_fast), correction_dim(rs.beta_slow)
    if rs.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # as the reference: avoid a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolation = 1 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv_freq, attention_factor


class RotaryEmbedding(torch.nn.Module):
    """cos/sin tables for given positions, shape [..., rope_dim/2], computed in fp32."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        inv_freq, self.attention_factor = rope_inv_freq(cfg)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self._cfg = cfg

    def reset(self, device) -> None:
        """Recompute the table (after a model built on the meta device is materialised)."""
        self.inv_freq = rope_inv_freq(self._cfg)[0].to(device)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.to(torch.float32)[..., None] * self.inv_freq.to(positions.device)
        return (freqs.cos() * self.attention_factor).to(dtype), (freqs.sin() * self.attention_factor).to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """Rotate the last dim of ``x`` ([..., rope_dim]); cos/sin broadcast against [..., rope_dim/2]."""
    return rope_reference(x, cos, sin, interleaved)
