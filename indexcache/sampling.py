"""Sampling parameters of one request, shaped like vLLM's ``SamplingParams``."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SamplingParams:
    """``temperature=0`` is greedy. ``top_k=0`` / ``top_p=1`` disable those filters. ``seed`` makes a sampled
    request reproducible whatever it is batched with. ``stop`` holds strings (needs a tokenizer) and/or token ids."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: list[str | int] | str | int | None = None
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None  # return the sampled token's log-probability and this many top alternatives

    def __post_init__(self):
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if self.logprobs is not None and (not isinstance(self.logprobs, int) or self.logprobs < 0):
            raise ValueError(f"logprobs must be an integer >= 0 (or None), got {self.logprobs!r}")
        stop = self.stop if isinstance(self.stop, (list, tuple)) else ([] if self.stop is None else [self.stop])
        bad = [s for s in stop if not isinstance(s, (str, int)) or isinstance(s, bool)]
        if bad:
            raise ValueError(f"stop entries must be strings or token ids, got {bad[0]!r}")
        self.stop_strings = [s for s in stop if isinstance(s, str) and s]
        self.stop_token_ids = list(self.stop_token_ids) + [s for s in stop if isinstance(s, int)]

    @property
    def greedy(self) -> bool:
        return self.temperature == 0
