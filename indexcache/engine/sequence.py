"""One request as the engine sees it: its tokens, how many of them sit in the KV cache, and its pages."""
from __future__ import annotations

import enum
import time

import numpy as np

from ..sampling import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"   # has tokens whose KV is not computed yet (new, partly prefilled, or preempted)
    RUNNING = "running"   # decoding: exactly one token (the last sampled) is not in the cache
    FINISHED = "finished"


class Sequence:
    def __init__(self, request_id: str, prompt_ids: list[int], params: SamplingParams, seed: int,
                 prompt: str | None = None):
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_ids = list(prompt_ids)
        self.token_ids = list(prompt_ids)
        self.params = params
        self.seed = seed                  # sampling noise is a pure function of (seed, output index, token id)
        self.status = Status.WAITING
        self.num_computed = 0             # tokens whose KV is stored in the cache
        self.block_table: list[int] = []  # physical page ids, in order
        self.block_hashes: list[bytes] = []  # prefix-cache names of the full token blocks (see block_manager)
        self.num_registered = 0           # leading pages already offered to the prefix cache
        self.num_cached_tokens: int | None = None  # prompt tokens found in the prefix cache when first scheduled
        # per output token: (logprob of the token, top token ids, their logprobs); only if params.logprobs is set
        self.logprobs: list[tuple[float, list[int], list[float]]] = []
        self.finish_reason: str | None = None
        self.stop_reason: str | int | None = None
        self.text = ""
        self.arrival = time.perf_counter()
        self.first_token_time: float | None = None
        self.num_preemptions = 0
        self._table_np = np.empty(0, dtype=np.int32)  # mirror of block_table, grown in place (see table_array)
        self._table_src: list[int] | None = None
        self._table_len = 0

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_prompt(self) -> int:
        return len(self.prompt_ids)

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[len(self.prompt_ids):]

    @property
    def num_uncomputed(self) -> int:
        return self.num_tokens - self.num_computed

    def table_array(self) -> np.ndarray:
        """The block table as int32 numpy, converting only pages added since the last call: rebuilding a 200K-token
        sequence's 3K-entry list every decode step cost milliseconds of host time per step."""
        t = self.block_table
        if self._table_src is not t or self._table_len > len(t):  # released (a new list) or shrunk: start over
            self._table_src, self._table_len = t, 0
        n = len(t)
        if n > self._table_len:
            if n > len(self._table_np):
                grown = np.empty(max(n, 2 * len(self._table_np), 16), dtype=np.int32)
                grown[:self._table_len] = self._table_np[:self._table_len]
                self._table_np = grown
            self._table_np[self._table_len:n] = t[self._table_len:n]
            self._table_len = n
        return self._table_np[:n]

    def __repr__(self):
        return (f"Sequence({self.request_id!r}, {self.status.value}, tokens={self.num_tokens}, "
                f"computed={self.num_computed}, blocks={len(self.block_table)})")
