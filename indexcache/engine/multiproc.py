"""The engine on N tensor-parallel ranks, driven from the user's process (``LLM(tensor_parallel_size=N)``).

Each rank process (``distributed.launch.RankProcesses``) loads its own shard (``load_sharded``) and runs an ordinary
``LLMEngine`` on it, SPMD: every rank receives the same requests in the same order, so every scheduler makes the
same decisions; the collectives inside the sharded model keep the ranks in step and rank 0's results are reported.
Faults (a rank that raises or dies) surface as ``WorkerError`` naming the rank; every rank then ends.
"""
from __future__ import annotations

import os
import logging
from dataclasses import asdict, dataclass, field

import torch

from ..distributed import load_sharded
from ..distributed.launch import RankProcesses, WorkerError
from .block_manager import OutOfBlocks
from .config import EngineConfig
from .engine import LLMEngine, check_request
from .sequence import Sequence, Status

__all__ = ["WorkerSpec", "Worker", "WorkerError", "start_workers", "generate", "RemoteEngine"]


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
        eng = self.engine
        return {"pattern": eng.pattern, "vocab_size": self.model.config.vocab_size,
                "cache_bytes": dict(eng.cache_bytes), "load": asdict(self.load_report), "pid": os.getpid(),
                "engine_config": eng.cfg, "eos_ids": set(eng.eos_ids), "num_blocks": eng.blocks.num_blocks}


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


# ----- step by step (the server's engine loop) ------------------------------------------------------------------------
class _Count:
    """Stands for a scheduler queue: only its length is known on the driver."""

    def __init__(self, n: int = 0):
        self.n = n

    def __len__(self) -> int:
        return self.n


@dataclass
class PageCounts:
    """Rank 0's KV page counts after the last step (what /metrics reads); every rank holds the same pages."""
    num_blocks: int
    page_size: int
    num_free: int = 0
    num_cached: int = 0
    query_tokens: int = 0
    hit_tokens: int = 0

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.page_size)


class RemoteEngine:
    """What the server's engine loop uses of an ``LLMEngine`` (add_request, abort, has_unfinished, step, the page
    counts and queue lengths), for an engine running SPMD on N ranks.

    Adds and aborts are checked here as the engine checks them and sent with the next step, one call for all ranks.
    Rank 0 (which samples) answers each step with its sequences' new tokens, log-probabilities and finish states;
    they update the ``Sequence`` objects handed out here, so the loop reads them as it reads the in-process ones.
    """

    def __init__(self, workers: RankProcesses, tokenizer=None):
        info = workers.infos[0]
        self.workers, self.tokenizer = workers, tokenizer
        self.cfg: EngineConfig = info["engine_config"]
        self.model = _ModelInfo(info["vocab_size"])
        self.eos_ids = set(info["eos_ids"])
        self.blocks = PageCounts(info["num_blocks"], self.cfg.page_size, num_free=info["num_blocks"])
        self.scheduler = _Queues()
        self.num_computed_tokens = 0
        self._cmds: list[tuple] = []
        self._live: dict[str, Sequence] = {}
        self._next_id = 0

    def add_request(self, prompt_ids: list[int], params, request_id: str | None = None,
                    prompt: str | None = None) -> Sequence:
        check_request(prompt_ids, params, self.model.config.vocab_size, self.cfg.max_model_len, self.tokenizer)
        if request_id is None:
            request_id = f"remote-{self._next_id}"
            self._next_id += 1
        if request_id in self._live:
            raise ValueError(f"request id {request_id!r} is in use")
        need = min(len(prompt_ids) + params.max_tokens, self.cfg.max_model_len)
        if self.blocks.blocks_for(need) > self.blocks.num_blocks:
            raise OutOfBlocks(f"request {request_id!r} may need {need} tokens = {self.blocks.blocks_for(need)} KV "
                              f"pages of {self.blocks.page_size}, but the cache holds only {self.blocks.num_blocks} "
                              "pages; raise num_kv_blocks / gpu_memory_utilization, lower max_tokens, or shorten "
                              "the prompt")
        seq = Sequence(request_id, prompt_ids, params, 0, prompt)
        self._live[request_id] = seq
        self.scheduler.waiting.n += 1  # until the next step's counts arrive
        self._cmds.append(("add", request_id, list(prompt_ids), params, prompt))
        return seq

    def abort(self, seq: Sequence) -> None:
        if seq.status is not Status.FINISHED:
            seq.status, seq.finish_reason = Status.FINISHED, "abort"
            self._live.pop(seq.request_id, None)
            self._cmds.append(("abort", seq.request_id))

    def has_unfinished(self) -> bool:
        return bool(self._live)

    def alive(self) -> bool:
        """False once the ranks are gone (one failed, so all were ended): the server then reports itself down."""
        return not self.workers.closed

    def step(self) -> list[Sequence]:
        cmds, self._cmds = self._cmds, []
        out = self.workers.collective_rpc(serve_step, cmds)[0]
        finished = []
        for rid, (new, logprobs, status, reason, stop, text, cached, first) in out["seqs"].items():
            seq = self._live.get(rid)
            if seq is None:  # aborted here meanwhile
                continue
            seq.token_ids += new
            seq.logprobs += logprobs
            seq.num_cached_tokens, seq.text = cached, text
            if first is not None and seq.first_token_time is None:
                seq.first_token_time = seq.arrival + first
            if status is Status.FINISHED:
                seq.finish_reason, seq.stop_reason = reason, stop
                seq.status = Status.FINISHED
                del self._live[rid]
                finished.append(seq)
            else:
                seq.status = status
        for rid, err in out["errors"].items():  # refused on the ranks although it passed the checks here
            seq = self._live.pop(rid, None)
            if seq is not None:
                log.error("request %s refused by the tensor-parallel engine: %s", rid, err)
                seq.status, seq.finish_reason = Status.FINISHED, "abort"
                finished.append(seq)
        st = out["stats"]
        self.scheduler.waiting.n, self.scheduler.running.n = st.pop("waiting"), st.pop("running")
        self.num_computed_tokens = st.pop("num_computed_tokens")
        for k, v in st.items():
            setattr(self.blocks, k, v)
        return finished


class _ModelInfo:
    def __init__(self, vocab_size: int):
        self.config = type("Config", (), {"vocab_size": vocab_size})()


class _Queues:
    def __init__(self):
        self.waiting, self.running = _Count(), _Count()


log = logging.getLogger("indexcache.engine")


def serve_step(worker: Worker, cmds: list[tuple]) -> dict | None:
    """Apply the driver's adds and aborts, run one engine step; rank 0 returns every live sequence's news since its
    last report, refused adds and the page counts."""
    eng = worker.engine
    live = worker.__dict__.setdefault("served", {})  # request id -> [Sequence, tokens reported]
    errors = {}
    for cmd in cmds:
        if cmd[0] == "add":
            try:
                live[cmd[1]] = [eng.add_request(cmd[2], cmd[3], request_id=cmd[1], prompt=cmd[4]), 0]
            except (ValueError, OutOfBlocks) as e:  # every rank refuses alike
                errors[cmd[1]] = str(e)
        else:
            entry = live.pop(cmd[1], None)
            if entry is not None:
                eng.abort(entry[0])
    if eng.has_unfinished():
        eng.step()
    news = {}
    for rid, entry in list(live.items()):
        s, sent = entry
        out = s.output_ids
        if worker.rank == 0 and (len(out) > sent or s.status is Status.FINISHED):
            first = (s.first_token_time - s.arrival) if s.first_token_time else None
            news[rid] = (out[sent:], s.logprobs[sent:len(out)], s.status, s.finish_reason, s.stop_reason, s.text,
                         s.num_cached_tokens or 0, first)
        entry[1] = len(out)
        if s.status is Status.FINISHED:
            del live[rid]
    if worker.rank:
        return None
    b, sch = eng.blocks, eng.scheduler
    return {"seqs": news, "errors": errors,
            "stats": {"waiting": len(sch.waiting), "running": len(sch.running), "num_free": b.num_free,
                      "num_cached": b.num_cached, "query_tokens": b.query_tokens, "hit_tokens": b.hit_tokens,
                      "num_computed_tokens": eng.num_computed_tokens}}
