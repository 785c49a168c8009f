"""Batched sampling on the device with no host sync: greedy, temperature, top-k, top-p.

Randomness is counter-based: the noise for (request seed, output index, token id) is a hash, so a seeded request
samples the same tokens whether it runs alone or batched with others, eagerly or in a CUDA graph, and no
per-request ``torch.Generator`` objects have to be stepped. Sampling is the Gumbel-max trick over the filtered
logits (equivalent to a multinomial draw from the filtered, renormalised distribution).
"""
from __future__ import annotations

import torch

_M1, _M2 = 0x7FEB352D, 0x5BD1E995  # odd multipliers < 2^31, so 32-bit products stay inside int64
_MASK = 0xFFFFFFFF


def _mix32(x: torch.Tensor) -> torch.Tensor:
    x = x & _MASK
    x = x ^ (x >> 16)
    x = (x * _M1) & _MASK
    x = x ^ (x >> 15)
    x = (x * _M2) & _MASK
    return x ^ (x >> 16)


def uniform_noise(seeds: torch.Tensor, steps: torch.Tensor, vocab: int) -> torch.Tensor:
    """U(0,1) [B, vocab] fp32, a pure function of (seed, step, token id)."""
    v = torch.arange(vocab, device=seeds.device, dtype=torch.int64)
    h = _mix32(seeds[:, None] * 0x9E3779B1 + _mix32(steps[:, None] + 0x632BE5AB))
    h = _mix32(h ^ _mix32(v[None] * 0x2545F491 + 0x27D4EB2F))
    return ((h >> 8).float() + 0.5) * (1.0 / (1 << 24))


@torch.inference_mode()
def sample(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor, top_k: torch.Tensor,
           seeds: torch.Tensor, steps: torch.Tensor, *, filtered: bool = True) -> torch.Tensor:
    """logits [B,V] fp32; per-row temperature/top_p (fp32), top_k/seeds/steps (int64) -> token ids [B] int64.

    temperature 0 = greedy; top_k 0 = no top-k; top_p 1 = no top-p. ``filtered=False`` promises that no row uses
    top-k or top-p (the caller knows from the request parameters, on the host): the vocabulary sort is skipped.
    """
    B, V = logits.shape
    greedy = logits.argmax(-1)
    t = torch.where(temperature > 0, temperature, torch.ones_like(temperature))
    scaled = logits / t[:, None]
    if not filtered:
        gumbel = -torch.log(-torch.log(uniform_noise(seeds, steps, V)))
        return torch.where(temperature > 0, (scaled + gumbel).argmax(-1), greedy)
    sorted_logits, order = scaled.sort(-1, descending=True)
    rank = torch.arange(V, device=logits.device)[None]
    k = torch.where(top_k > 0, top_k, torch.full_like(top_k, V))
    drop = rank >= k[:, None]
    probs = torch.softmax(sorted_logits.masked_fill(drop, float("-inf")), -1)
    drop |= (probs.cumsum(-1) - probs) > top_p[:, None]  # keep the smallest prefix with mass >= top_p
    drop[:, 0] = False
    mask = torch.empty_like(drop).scatter_(1, order, drop)
    gumbel = -torch.log(-torch.log(uniform_noise(seeds, steps, V)))
    sampled = (scaled.masked_fill(mask, float("-inf")) + gumbel).argmax(-1)
    return torch.where(temperature > 0, sampled, greedy)
