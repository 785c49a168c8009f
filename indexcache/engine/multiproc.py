"""The engine on N tensor-parallel ranks, driven from the user's process (``LLM(tensor_parallel_size=N)``).

Each rank process (``distributed.launch.RankProcesses``) loads its own shard (``load_sharded``) and runs an ordinary
``LLMEngine`` on it, SPMD: every rank receives the same requests in the same order, so every scheduler makes the
same decisions; the collectives inside the sharded model keep the ranks in step and rank 0's results are reported.
Faults (a rank that raises or dies) surface as ``WorkerError`` naming the rank; every rank then ends.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field

import torch

from ..distributed import load_sharded
from ..distributed.launch import RankProcesses, WorkerError
from .config import EngineConfig
from .engine import LLMEngine

__all__ = ["WorkerSpec", "Worker", "WorkerError", "start_workers", "generate"]


@dataclass
class WorkerSpec:
    model: str
    dtype: torch.dtype = torch.float32
    index_pattern: object = None
    seed: int = 0
    tokenizer: object = None
    engine_options: dict = field(default_factory=dict)
    weight_dtype: str = "auto"


class Worker:
    """What a rank holds; ``collective_rpc`` functions receive it."""

    def __init__(self, ctx, spec: WorkerSpec):
        self.ctx, self.rank = ctx, ctx.rank
        self.model, self.load_report = load_sharded(spec.model, ctx, dtype=spec.dtype,
                                                    index_pattern=spec.index_pattern, seed=spec.seed,
                                                    weight_dtype=spec.weight_dtype)
        self.engine = LLMEngine(self.model, EngineConfig(seed=spec.seed, **spec.engine_options),
                                tokenizer=spec.tokenizer)

    def info(self) -> dict:
        return {"pattern": self.engine.pattern, "vocab_size": self.model.config.vocab_size,
                "cache_bytes": dict(self.engine.cache_bytes), "load": asdict(self.load_report), "pid": os.getpid()}


def start_workers(spec: WorkerSpec, world: int, *, device_type: str, expert_parallel: bool) -> RankProcesses:
    return RankProcesses(world, Worker, (spec,), device_type=device_type, expert_parallel=expert_parallel)


def generate(worker: Worker, requests: list) -> list[dict] | None:
    """Run (token ids, SamplingParams, prompt text) requests to completion; rank 0 returns what the driver needs."""
    eng = worker.engine
    seqs = [eng.add_request(ids, params, prompt=text) for ids, params, text in requests]
    while eng.has_unfinished():
        eng.step()
    if worker.rank:
        return None
    return [{"request_id": s.request_id, "prompt": s.prompt, "prompt_ids": s.prompt_ids, "output_ids": s.output_ids,
             "finish_reason": s.finish_reason, "stop_reason": s.stop_reason, "text": s.text,
             "ttft_s": (s.first_token_time - s.arrival) if s.first_token_time else None,
             "num_preemptions": s.num_preemptions} for s in seqs]
