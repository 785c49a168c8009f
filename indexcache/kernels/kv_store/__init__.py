"""Cache writes (indexer FP8 keys, MLA latent bf16 / FP8): ``ops`` dispatches, ``reference`` is plain PyTorch,
``triton`` holds the kernels; the byte layouts are in ``indexcache.kernels.formats``."""
from indexcache.kernels.formats import (
    INDEX_PAGE_BYTES as PAGE_BYTES,
    LATENT_FP8_BYTES,
    NOPE,
    PAGE,
    ROPE,
    cache_views,
    dequant_latent_fp8,
    gather_indexer_k,
    quantize_latent_fp8,
)
from indexcache.kernels.kv_store.ops import new_indexer_cache, store_indexer_k, store_latent_bf16, store_latent_fp8

__all__ = [
    "PAGE", "PAGE_BYTES", "LATENT_FP8_BYTES", "NOPE", "ROPE", "store_indexer_k", "store_latent_bf16",
    "store_latent_fp8", "dequant_latent_fp8", "gather_indexer_k", "cache_views", "quantize_latent_fp8",
    "new_indexer_cache",
]
