"""Engine options, validated once (a frozen dataclass, runtime values such as the page count live elsewhere)."""
from __future__ import annotations

from dataclasses import dataclass

LATENT_FORMATS = ("auto", "bf16", "fp16", "fp32", "fp8")
INDEXER_FORMATS = ("auto", "exact", "fp8")


@dataclass(frozen=True)
class EngineConfig:
    max_model_len: int = 4096
    max_num_seqs: int = 16
    max_prefill_tokens: int = 8192        # token budget of one step (prefill chunk size; decode tokens count too)
    page_size: int = 64
    kv_cache_dtype: str = "auto"          # latent cache: auto = model dtype, bf16/fp16/fp32, or fp8 (FlashMLA 656 B)
    indexer_cache: str = "auto"           # exact = model-dtype keys + fp32 scores; fp8 = 132 B/token + FP8 kernels
    num_kv_blocks: int | None = None      # pages; default: gpu_memory_utilization on CUDA, enough for all on CPU
    gpu_memory_utilization: float = 0.9
    enforce_eager: bool = False
    cuda_graph_max_bs: int = 64
    workspace_bytes: int = 1 << 30        # bounds prefill temporaries (indexer logits, gathered KV rows)
    compile_decode: bool | None = None    # torch.compile the decode glue (fewer, fused kernels); None = on CUDA
                                          # unless enforce_eager. Process-wide effect: raises torch._dynamo's
                                          # cache_size_limit to >= 64 (glue.compile_glue says why)
    compile_backend: str = "inductor"
    moe_small_batch_kernel: bool = True   # decode-sized MoE batches on the GPU: Triton kernel (True) or
                                          # torch._grouped_mm (False)
    enable_prefix_caching: bool = True   # share full KV pages between requests with a common token prefix
    decode_topk_max_rows: int = 16        # FP8 indexer on the GPU: decode batches of up to this many sequences
                                          # select with the many-programs top-k (topk_rows_decode; its workspace,
                                          # 16 B per key per row, is allocated once); 0 = always topk_rows.
                                          # H200 run 29 at 200K: 1.84x at b1, 1.28x at b16, 0.71x at b64
    seed: int = 0

    def __post_init__(self):
        for key in ("max_model_len", "max_num_seqs", "max_prefill_tokens", "page_size"):
            v = getattr(self, key)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{key} must be a positive integer, got {v!r}")
        if self.kv_cache_dtype not in LATENT_FORMATS:
            raise ValueError(f"kv_cache_dtype must be one of {LATENT_FORMATS}, got {self.kv_cache_dtype!r}")
        if self.indexer_cache not in INDEXER_FORMATS:
            raise ValueError(f"indexer_cache must be one of {INDEXER_FORMATS}, got {self.indexer_cache!r}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if not isinstance(self.decode_topk_max_rows, int) or self.decode_topk_max_rows < 0:
            raise ValueError(f"decode_topk_max_rows must be an integer >= 0, got {self.decode_topk_max_rows!r}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError(f"num_kv_blocks must be >= 1, got {self.num_kv_blocks}")

    @property
    def max_blocks_per_seq(self) -> int:
        return -(-self.max_model_len // self.page_size)

