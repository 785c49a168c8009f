"""The paged KV cache: an MLA latent cache for every layer, an indexer key cache for Full and Re-rank layers only.

Latent rows are [c_kv | k_pe] (576 values for the real models) in bf16/fp16/fp32, or FlashMLA's 656-byte FP8
format. Indexer keys are either kept exactly (model dtype, [pages, page, d_I]) or as DeepGEMM's paged FP8 layout
(uint8 [pages, 8448] = 64 x 128 B e4m3 keys then 64 fp32 scales, 132 B/token). Shared (S) layers never read or
write indexer keys, so they get no indexer cache at all: that is IndexCache's memory saving. Re-rank (R) layers
score their own keys (at the candidates' slots), so they keep a cache like F layers.

Slot ids are ``page * page_size + offset``. One extra page at the end is scratch space for padded batch entries
(CUDA-graph buckets), so writes never need masking and never land in a real sequence's page.
"""
from __future__ import annotations

import torch

from ..config import ModelConfig
from ..pattern import IndexPattern, LayerPlan

_DT = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
FP8_LATENT_BYTES = 656
FP8_INDEX_BYTES = 132


def bytes_per_token(cfg: ModelConfig, pattern: IndexPattern | LayerPlan, latent: str = "bf16", indexer: str = "fp8",
                    model_dtype: torch.dtype = torch.bfloat16) -> dict:
    """Cache bytes per token of context for ``pattern`` (all layers), split into latent and indexer parts."""
    width = cfg.kv_lora_rank + cfg.qk_rope_head_dim
    per_latent = FP8_LATENT_BYTES if latent == "fp8" else width * _DT[latent].itemsize
    per_index = FP8_INDEX_BYTES if indexer == "fp8" else cfg.index_head_dim * model_dtype.itemsize
    lat = per_latent * cfg.num_layers
    n_indexed = len((pattern.pattern if isinstance(pattern, LayerPlan) else pattern).indexer_layers)  # F and R
    idx = per_index * n_indexed
    full_idx = per_index * cfg.num_layers
    return {"latent": lat, "indexer": idx, "total": lat + idx, "total_if_every_layer_had_indexer_cache": lat + full_idx,
            "latent_per_layer": per_latent, "indexer_per_full_layer": per_index, "num_full_layers": pattern.num_full,
            "num_indexer_cache_layers": n_indexed,
            "saving_vs_full_dsa": 1 - (lat + idx) / (lat + full_idx)}


class KVCache:
    """The cache tensors and their layout; the attention backend (attention_backend.py) reads and writes them."""

    def __init__(self, cfg: ModelConfig, plan: LayerPlan, num_blocks: int, page_size: int, latent: str,
                 indexer: str, model_dtype: torch.dtype, device):
        self.cfg, self.plan = cfg, plan
        self.num_blocks, self.page_size = num_blocks, page_size
        self.latent_format, self.indexer_format, self.model_dtype = latent, indexer, model_dtype
        self.width = cfg.kv_lora_rank + cfg.qk_rope_head_dim
        self.scratch_block = num_blocks
        n = num_blocks + 1
        if latent == "fp8":
            self.latent = [torch.zeros(n, page_size, FP8_LATENT_BYTES, dtype=torch.uint8, device=device)
                           for _ in range(cfg.num_layers)]
        else:
            self.latent = [torch.zeros(n, page_size, self.width, dtype=_DT[latent], device=device)
                           for _ in range(cfg.num_layers)]
        self.index: list[torch.Tensor | None] = []
        for i in range(cfg.num_layers):
            if not plan.runs_indexer(i):
                self.index.append(None)
            elif indexer == "fp8":
                self.index.append(torch.zeros(n, 64 * FP8_INDEX_BYTES, dtype=torch.uint8, device=device))
            else:
                self.index.append(torch.zeros(n, page_size, cfg.index_head_dim, dtype=model_dtype, device=device))

    @property
    def scratch_slot(self) -> int:
        return self.scratch_block * self.page_size

    def bytes_per_token(self) -> dict:
        return bytes_per_token(self.cfg, self.plan, self.latent_format, self.indexer_format, self.model_dtype)

    def allocated_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.latent + [x for x in self.index if x is not None])

    # ----- indexer keys (layers that run their indexer only) ------------------------------------------------------
    def index_cache(self, layer: int) -> torch.Tensor:
        cache = self.index[layer]
        if cache is None:
            raise RuntimeError(f"layer {layer} is a shared (S) layer under pattern {self.plan}: it has no "
                               "indexer cache")
        return cache

    def gather_index_k(self, layer: int, slots: torch.Tensor) -> torch.Tensor:
        """Exact-format keys [..., d_I] of the given slots."""
        cache = self.index_cache(layer)
        return cache.view(-1, cache.shape[-1])[slots]
