"""The offline API, shaped like vLLM's: ``LLM(model).generate(prompts, SamplingParams(...))``."""
from __future__ import annotations

import operator
import os
import time
from dataclasses import dataclass, field

import torch

from .checkpoint import load_model
from .engine.config import EngineConfig
from .engine.engine import LLMEngine
from .sampling import SamplingParams
from .tokenizer import Tokenizer, find_tokenizer, load_tokenizer


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None
    stop_reason: str | int | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = True
    metrics: dict = field(default_factory=dict)


class LLM:
    """A DSA model served by the IndexCache engine.

    ``model``: a checkpoint folder (config.json + safetensors, tokenizer optional: see ``indexcache.tokenizer``) or
    a preset name (random weights from ``seed``; presets have no tokenizer, so they take token-id prompts).
    ``index_pattern``: an F/S string, "1/N" or "all" (default: the checkpoint's own); it means what it means to
    ``load_model``, which builds the model with it (S layers get no indexer weights), and the engine runs the
    model's pattern. ``weight_dtype``: "auto" (FP8 checkpoints stay FP8 on a GPU with the block-scaled FP8 GEMM),
    "fp8" or "bf16" (see ``load_model``). ``tokenizer``: a folder or a ``Tokenizer`` to use instead of the
    checkpoint's. ``max_model_len`` defaults to the model's ``max_position_embeddings``. Other keywords are
    ``EngineConfig`` fields.
    """

    def __init__(self, model: str, index_pattern=None, *, device=None, dtype: torch.dtype | None = None,
                 seed: int = 0, tokenizer: str | Tokenizer | None = None, weight_dtype: str = "auto",
                 **engine_options):
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if dtype is None:
            dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        self.model = load_model(model, device=device, dtype=dtype, index_pattern=index_pattern, seed=seed,
                                weight_dtype=weight_dtype)
        if isinstance(tokenizer, str):
            self.tokenizer = load_tokenizer(tokenizer)
        else:
            self.tokenizer = tokenizer if tokenizer is not None else find_tokenizer(model)
        if engine_options.get("max_model_len") is None:
            engine_options["max_model_len"] = self.model.config.max_position_embeddings
        self.engine = LLMEngine(self.model, EngineConfig(seed=seed, **engine_options), tokenizer=self.tokenizer)

    @property
    def pattern(self):
        return self.engine.pattern

    def cache_bytes_per_token(self) -> dict:
        return dict(self.engine.cache_bytes)

    def generate(self, prompts, sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = False) -> list[RequestOutput]:
        """prompts: a string, a list of strings, a list of token ids, or a list of token-id lists."""
        prompts = _as_list(prompts)
        if sampling_params is None:
            sampling_params = SamplingParams()
        params = sampling_params if isinstance(sampling_params, list) else [sampling_params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"{len(params)} SamplingParams for {len(prompts)} prompts")
        seqs = []
        try:
            for prompt, p in zip(prompts, params):
                text, ids = self._encode(prompt)
                seqs.append(self.engine.add_request(ids, p, prompt=text))
            while self.engine.has_unfinished():
                self.engine.step()
        except BaseException:
            for s in seqs:
                self.engine.abort(s)
            raise
        return [self._output(s) for s in seqs]

    def _encode(self, prompt) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this model has no tokenizer (presets and checkpoints without tokenizer files): "
                                 "pass prompts as lists of token ids")
            return prompt, self.tokenizer.encode(prompt)
        return None, [_token_id(t, "prompt token id") for t in prompt]

    def _output(self, s) -> RequestOutput:
        text = s.text
        if self.tokenizer is not None and not (s.finish_reason == "stop" and isinstance(s.stop_reason, str)):
            text = self.tokenizer.decode(s.output_ids, skip_special_tokens=True)
        ttft = (s.first_token_time - s.arrival) if s.first_token_time else None
        return RequestOutput(s.request_id, s.prompt, s.prompt_ids,
                             [CompletionOutput(0, text, s.output_ids, s.finish_reason, s.stop_reason)],
                             metrics={"ttft_s": ttft, "preemptions": s.num_preemptions, "finished": time.time()})


def _as_list(prompts) -> list:
    if isinstance(prompts, str):
        return [prompts]
    prompts = list(prompts)
    if prompts and all(isinstance(t, int) for t in prompts):
        return [prompts]  # one token-id prompt
    return prompts


def _token_id(t, what: str) -> int:
    """An integer token id; floats (1.7), bools and strings are errors, never truncated."""
    if isinstance(t, bool):
        raise ValueError(f"{what} must be an integer, got {t!r}")
    try:
        return operator.index(t)
    except TypeError:
        raise ValueError(f"{what} must be an integer, got {t!r} ({type(t).__name__})") from None
