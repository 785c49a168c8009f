"""Sampling parameters of one request, shaped like vLLM's ``SamplingParams``."""
from __future__ import annotations

import math
import numbers
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
        _integer("max_tokens", self.max_tokens, 1)
        _number("temperature", self.temperature)
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature!r}")
        _number("top_p", self.top_p)
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        _integer("top_k", self.top_k, 0, " (0 = off)")
        if self.seed is not None:
            _integer("seed", self.seed)
        if not isinstance(self.ignore_eos, bool):
            raise ValueError(f"ignore_eos must be True or False, got {self.ignore_eos!r}")
        if not isinstance(self.stop_token_ids, (list, tuple)):
            raise ValueError(f"stop_token_ids must be a list of token ids, got {self.stop_token_ids!r}")
        for t in self.stop_token_ids:
            _integer("stop_token_ids entry", t, 0)
        if self.logprobs is not None:
            _integer("logprobs", self.logprobs, 0, " (or None)")
        stop = self.stop if isinstance(self.stop, (list, tuple)) else ([] if self.stop is None else [self.stop])
        bad = [s for s in stop if not isinstance(s, (str, int)) or isinstance(s, bool)
               or (isinstance(s, int) and s < 0)]
        if bad:
            raise ValueError(f"stop entries must be strings or token ids (integers >= 0), got {bad[0]!r}")
        self.stop_strings = [s for s in stop if isinstance(s, str) and s]
        self.stop_token_ids = list(self.stop_token_ids) + [s for s in stop if isinstance(s, int)]

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def _number(name: str, v) -> None:
    """A real, finite number (not a bool, a string or nan/inf)."""
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise ValueError(f"{name} must be a number, got {v!r} ({type(v).__name__})")
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {v!r}")


def _integer(name: str, v, minimum: int | None = None, note: str = "") -> None:
    """An integer (floats such as 1.7 or 2.0 and bools are errors, never truncated)."""
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise ValueError(f"{name} must be an integer{note}, got {v!r} ({type(v).__name__})")
    if minimum is not None and v < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}{note}, got {v!r}")
