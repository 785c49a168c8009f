"""Continuous batching with chunked prefill.

Each step spends a token budget (``max_prefill_tokens``): first one token for every running (decoding) sequence,
then prompt chunks of waiting sequences in arrival order. Requests join and leave between steps. A sequence that
cannot get KV pages waits; if a decoding sequence cannot grow, the most recently started one is preempted (its
pages are freed and it is recomputed later), so no request ever writes into pages it does not own.
"""
from __future__ import annotations

from collections import deque

from .block_manager import BlockManager
from .config import EngineConfig
from .sequence import Sequence, Status


class Scheduler:
    def __init__(self, cfg: EngineConfig, blocks: BlockManager):
        self.cfg, self.blocks = cfg, blocks
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> list[tuple[Sequence, int]]:
        """(sequence, number of tokens to compute this step) pairs; decodes first, then prefill chunks."""
        budget = self.cfg.max_prefill_tokens
        work: list[tuple[Sequence, int]] = []
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            while not self.blocks.can_grow(seq, seq.num_tokens):
                victim = self.running.pop()
                self._preempt(victim)
                if victim is seq:
                    break
            else:
                self.blocks.grow(seq, seq.num_tokens)
                work.append((seq, 1))
                budget -= 1
                i += 1
        started = len(self.running)
        for seq in list(self.waiting):
            if budget <= 0 or started >= self.cfg.max_num_seqs:
                break
            if not seq.block_table:
                self.blocks.match_prefix(seq)  # a cached prefix is not computed again
            n = min(seq.num_uncomputed, budget)
            if not self.blocks.can_grow(seq, seq.num_computed + n):
                # take what fits now (whole pages), the rest waits for pages to come back
                free_tokens = (len(seq.block_table) + self.blocks.num_free) * self.blocks.page_size
                n = min(n, free_tokens - seq.num_computed)
                if n <= 0 and not work:
                    self._release_others(seq)  # only partly prefilled sequences hold pages: let the head go first
                    n = min(seq.num_uncomputed, budget,
                            (len(seq.block_table) + self.blocks.num_free) * self.blocks.page_size - seq.num_computed)
                if n <= 0:
                    break
            self.blocks.grow(seq, seq.num_computed + n)
            work.append((seq, n))
            budget -= n
            started += 1
            if n < seq.num_uncomputed:
                break  # a partial chunk: later sequences wait for it (FIFO)
        return work

    def _preempt(self, seq: Sequence) -> None:
        self.blocks.release(seq)
        seq.status = Status.WAITING
        seq.num_preemptions += 1
        self.waiting.appendleft(seq)

    def _release_others(self, keep: Sequence) -> None:
        for other in self.waiting:
            if other is not keep and other.block_table:
                self.blocks.release(other)

    def promote(self, seq: Sequence) -> None:
        """A sequence whose prompt is fully cached starts decoding."""
        if seq.status is Status.WAITING:
            self.waiting.remove(seq)
            seq.status = Status.RUNNING
            self.running.append(seq)

    def finish(self, seq: Sequence, reason: str) -> None:
        seq.status = Status.FINISHED
        seq.finish_reason = reason
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.release(seq)
