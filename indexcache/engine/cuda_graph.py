"""Decode forwards replayed from CUDA graphs, one per batch-size bucket (1, 2, 4, ... max).

Inputs are copied into static buffers; rows past the real batch point at the cache's scratch page, so padded rows
compute garbage that nobody reads and write nowhere that matters. The indexer scores all ``max_model_len`` key
positions (masked past each context length), so one graph per bucket serves every context length; the results are
the eager decode's (the eager path only trims the masked tail).
"""
from __future__ import annotations

import gc

import torch

from .runner import ForwardBatch, ModelRunner


class DecodeGraphs:
    def __init__(self, runner: ModelRunner, max_bs: int):
        self.runner = runner
        self.buckets = sorted({b for b in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512) if b < max_bs} | {max_bs})
        self.max_bs = max_bs
        cfg, dev = runner.cfg, runner.device
        self.width = cfg.max_blocks_per_seq
        self.max_len = self.width * cfg.page_size
        self.ids = torch.zeros(max_bs, dtype=torch.int64, device=dev)
        self.pos = torch.zeros(max_bs, dtype=torch.int64, device=dev)
        self.slots = torch.zeros(max_bs, dtype=torch.int64, device=dev)
        self.table = torch.zeros(max_bs, self.width, dtype=torch.int32, device=dev)
        self.ctx = torch.zeros(max_bs, dtype=torch.int32, device=dev)
        self.last = torch.arange(max_bs, dtype=torch.int64, device=dev)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = None
        self._pad(0)

    def _pad(self, start: int) -> None:
        kv = self.runner.kv
        self.ids[start:] = 0
        self.pos[start:] = 0
        self.slots[start:] = kv.scratch_slot
        self.table[start:] = kv.scratch_block
        self.ctx[start:] = 1

    def _batch(self, bs: int) -> ForwardBatch:
        return ForwardBatch(self.ids[:bs], self.pos[:bs], self.slots[:bs], self.table[:bs], self.ctx[:bs],
                            self.last[:bs], [], True, self.max_len)

    def capture(self, bs: int) -> None:
        self._pad(0)  # warm-up and capture must write only to the scratch page
        b = self._batch(bs)
        timer, self.runner.timer = self.runner.timer, None
        gc_was_on = gc.isenabled()
        try:
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                for _ in range(2):
                    self.runner.forward(b)
            torch.cuda.current_stream().wait_stream(s)
            # A garbage collection inside the capture can free objects that unload CUDA modules (e.g. Triton
            # kernels compiled by an earlier torch.compile), which invalidates the capture; torch no longer
            # collects before capturing, so collect here and keep the collector off until the capture ends.
            gc.collect()
            gc.disable()
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=self.pool):
                out = self.runner.forward(b)
            self.pool = g.pool()
            self.graphs[bs] = (g, out)
        finally:
            if gc_was_on:
                gc.enable()
            self.runner.timer = timer

    def bucket(self, n: int) -> int | None:
        return next((b for b in self.buckets if b >= n), None)

    def run(self, batch: ForwardBatch) -> torch.Tensor:
        n = batch.input_ids.shape[0]
        bs = self.bucket(n)
        if bs not in self.graphs:
            self.capture(bs)
        self.ids[:n] = batch.input_ids
        self.pos[:n] = batch.positions
        self.slots[:n] = batch.slot_mapping
        self.table[:n] = batch.block_table
        self.ctx[:n] = batch.context_lens
        self._pad(n)
        g, out = self.graphs[bs]
        g.replay()
        return out[:n]
