"""The serving engine: paged KV cache (indexer keys for Full layers only), continuous batching with chunked
prefill, a runner over the paged cache, device-side sampling and CUDA-graph decode."""
from .block_manager import BlockManager, OutOfBlocks
from .config import EngineConfig
from .engine import LLMEngine
from .kv_cache import KVCache, bytes_per_token

__all__ = ["BlockManager", "OutOfBlocks", "EngineConfig", "LLMEngine", "KVCache", "bytes_per_token"]
