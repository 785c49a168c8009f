"""Page accounting for the paged KV cache: one free list shared by every layer's latent and indexer caches.

A page id addresses the same page in each layer's cache, so a sequence has one block table. Pages are given to a
sequence as its KV grows and all come back when it finishes or is preempted; nothing is shared between requests,
so running out of pages can only delay (queue) or refuse a request, never touch another one's pages.
"""
from __future__ import annotations

from collections import deque

from .sequence import Sequence


class OutOfBlocks(RuntimeError):
    """The KV cache cannot hold a request."""


class BlockManager:
    def __init__(self, num_blocks: int, page_size: int):
        if num_blocks < 1:
            raise ValueError(f"the KV cache needs at least one page, got num_blocks={num_blocks}")
        self.num_blocks, self.page_size = num_blocks, page_size
        self.free = deque(range(num_blocks))

    @property
    def num_free(self) -> int:
        return len(self.free)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.page_size)

    def can_grow(self, seq: Sequence, num_tokens: int) -> bool:
        return self.blocks_for(num_tokens) - len(seq.block_table) <= len(self.free)

    def grow(self, seq: Sequence, num_tokens: int) -> None:
        """Make ``seq``'s block table cover ``num_tokens`` tokens."""
        need = self.blocks_for(num_tokens) - len(seq.block_table)
        if need > len(self.free):
            raise OutOfBlocks(f"request {seq.request_id!r} needs {need} more KV pages, {len(self.free)} are free")
        for _ in range(max(need, 0)):
            seq.block_table.append(self.free.popleft())

    def release(self, seq: Sequence) -> None:
        self.free.extend(seq.block_table)
        seq.block_table = []
        seq.num_computed = 0

    def check_fits(self, seq: Sequence, num_tokens: int) -> None:
        """Refuse a request that could not run even with the whole cache to itself."""
        need = self.blocks_for(num_tokens)
        if need > self.num_blocks:
            raise OutOfBlocks(
                f"request {seq.request_id!r} may need {num_tokens} tokens = {need} KV pages of {self.page_size}, "
                f"but the cache holds only {self.num_blocks} pages ({self.num_blocks * self.page_size} tokens); "
                f"raise num_kv_blocks / gpu_memory_utilization, lower max_tokens, or shorten the prompt")
