"""Sparse MLA attention in absorbed (MQA) mode, prefill and paged decode (bf16 or FP8 latent cache): ``ops``
checks and plans the launches, ``reference`` is plain PyTorch, ``triton`` holds the kernels."""
from indexcache.kernels.sparse_mla.ops import (
    dequant_latent_rows,
    sparse_mla_decode,
    sparse_mla_decode_workspace_bytes,
    sparse_mla_prefill,
)
from indexcache.kernels.sparse_mla.reference import (
    dequant_latent_fp8_reference,
    quantize_latent_fp8_reference,
    sparse_mla_decode_reference,
    sparse_mla_prefill_reference,
)

__all__ = ["dequant_latent_rows", "sparse_mla_prefill", "sparse_mla_decode", "sparse_mla_decode_workspace_bytes",
           "sparse_mla_prefill_reference", "sparse_mla_decode_reference", "dequant_latent_fp8_reference",
           "quantize_latent_fp8_reference"]
