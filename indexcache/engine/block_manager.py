"""Page accounting for the paged KV cache: one free list shared by every layer's latent and indexer caches.

A page id addresses the same page in each layer's latent cache and in each Full layer's indexer-key cache, so a
sequence has one block table and sharing a page shares both caches.

Automatic prefix caching: a page that is full and computed is named by a hash chain over the token blocks up to and
including it (the KV of position p depends on tokens 0..p only). A new sequence whose leading blocks hash the same
shares those pages (reference-counted) and starts computing after them. Pages nobody references keep their content
and stay findable until they are needed: they count as free and are evicted least-recently-used, tail pages of a
prefix before its head. Shared pages are only ever read: a sequence writes at positions >= its cached length, which
is a page boundary, so its writes always land in pages it owns alone.
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict, deque

import numpy as np

from .sequence import Sequence


class OutOfBlocks(RuntimeError):
    """The KV cache cannot hold a request."""


class BlockManager:
    def __init__(self, num_blocks: int, page_size: int, enable_prefix_caching: bool = False):
        if num_blocks < 1:
            raise ValueError(f"the KV cache needs at least one page, got num_blocks={num_blocks}")
        self.num_blocks, self.page_size = num_blocks, page_size
        self.prefix_caching = enable_prefix_caching
        self.free = deque(range(num_blocks))           # pages holding nothing reusable
        self.ref = [0] * num_blocks
        self.hash_of: list[bytes | None] = [None] * num_blocks
        self.cached: dict[bytes, int] = {}             # block hash -> page holding that block's KV
        self.evictable: OrderedDict[int, None] = OrderedDict()  # unreferenced cached pages, least recent first
        self.query_tokens = 0                          # prompt tokens looked up in the prefix cache
        self.hit_tokens = 0                            # ... and found there

    @property
    def num_free(self) -> int:
        """Pages a sequence can get now (empty ones plus unreferenced cached ones, which are evicted on demand)."""
        return len(self.free) + len(self.evictable)

    @property
    def num_cached(self) -> int:
        return len(self.cached)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.page_size)

    def can_grow(self, seq: Sequence, num_tokens: int) -> bool:
        return self.blocks_for(num_tokens) - len(seq.block_table) <= self.num_free

    def grow(self, seq: Sequence, num_tokens: int) -> None:
        """Make ``seq``'s block table cover ``num_tokens`` tokens."""
        need = self.blocks_for(num_tokens) - len(seq.block_table)
        if need > self.num_free:
            raise OutOfBlocks(f"request {seq.request_id!r} needs {need} more KV pages, {self.num_free} are free")
        for _ in range(max(need, 0)):
            seq.block_table.append(self._take())

    def _take(self) -> int:
        if self.free:
            b = self.free.popleft()
        else:
            b, _ = self.evictable.popitem(last=False)
            del self.cached[self.hash_of[b]]
            self.hash_of[b] = None
        self.ref[b] = 1
        return b

    def release(self, seq: Sequence) -> None:
        for b in reversed(seq.block_table):  # tail first: a prefix's tail is evicted before its head
            self.ref[b] -= 1
            if self.ref[b] == 0:
                if self.hash_of[b] is None:
                    self.free.append(b)
                else:
                    self.evictable[b] = None
        seq.block_table = []
        seq.num_computed = 0
        seq.num_registered = 0

    # ----- prefix caching ---------------------------------------------------------------------------------------
    def match_prefix(self, seq: Sequence) -> int:
        """Give a sequence that holds no pages the cached pages of its longest cached prefix and start its
        computation after them; returns the number of tokens found. At least the last token is always left to
        compute (its logits are needed)."""
        if not self.prefix_caching or seq.block_table:
            return 0
        limit = (seq.num_tokens - 1) // self.page_size
        for h in self._hashes(seq, limit):
            b = self.cached.get(h)
            if b is None:
                break
            if self.ref[b] == 0:
                del self.evictable[b]
            self.ref[b] += 1
            seq.block_table.append(b)
        seq.num_registered = len(seq.block_table)
        seq.num_computed = seq.num_registered * self.page_size
        if seq.num_cached_tokens is None:  # hit rate over requests' prompts (a preempted one is not re-counted)
            seq.num_cached_tokens = seq.num_computed
            self.query_tokens += seq.num_prompt
            self.hit_tokens += seq.num_computed
        return seq.num_computed

    def commit(self, seq: Sequence) -> None:
        """Make ``seq``'s pages that are now full and computed findable by later requests."""
        if not self.prefix_caching:
            return
        full = min(seq.num_computed // self.page_size, len(seq.block_table))
        if full <= seq.num_registered:
            return
        hashes = self._hashes(seq, full)
        for j in range(seq.num_registered, full):
            b, h = seq.block_table[j], hashes[j]
            if self.hash_of[b] is None and h not in self.cached:  # a twin computed concurrently keeps the name
                self.cached[h] = b
                self.hash_of[b] = h
        seq.num_registered = full

    def _hashes(self, seq: Sequence, n: int) -> list[bytes]:
        """Chained hashes of ``seq``'s first ``n`` full token blocks (kept on the sequence: tokens only grow)."""
        hs, page = seq.block_hashes, self.page_size
        if len(hs) < n:
            ids = np.asarray(seq.token_ids[len(hs) * page:n * page], dtype=np.int64)
            prev = hs[-1] if hs else b""
            for j in range(n - len(hs)):
                prev = hashlib.blake2b(prev + ids[j * page:(j + 1) * page].tobytes(), digest_size=16).digest()
                hs.append(prev)
        return hs[:n]

    def check_fits(self, seq: Sequence, num_tokens: int) -> None:
        """Refuse a request that could not run even with the whole cache to itself."""
        need = self.blocks_for(num_tokens)
        if need > self.num_blocks:
            raise OutOfBlocks(
                f"request {seq.request_id!r} may need {num_tokens} tokens = {need} KV pages of {self.page_size}, "
                f"but the cache holds only {self.num_blocks} pages ({self.num_blocks * self.page_size} tokens); "
                f"raise num_kv_blocks / gpu_memory_utilization, lower max_tokens, or shorten the prompt")
