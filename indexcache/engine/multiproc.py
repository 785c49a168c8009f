"""The engine on N tensor-parallel ranks, driven from the user's process.

``TPWorkers`` spawns one process per rank (per GPU, or per CPU rank with gloo). Each loads its own shard
(``load_sharded``) and runs an ordinary ``LLMEngine`` on it, SPMD: every rank receives the same requests in the same
order, so every scheduler makes the same decisions; the collectives inside the sharded model keep the ranks in step
and rank 0's tokens are the ones reported. The driver talks to each worker over a pipe and watches every process:
a worker that raises or dies makes the driver raise ``WorkerError`` naming the rank and the cause, and tear the
others down, within about a second; ``close()`` (also on garbage collection, at exit, on Ctrl-C in a call) ends
every worker.
"""
from __future__ import annotations

import os
import signal
import socket
import traceback
import weakref
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import wait

import torch
import torch.multiprocessing as mp

_POLL_S = 0.5


class WorkerError(RuntimeError):
    """A tensor-parallel worker raised or died; ``rank`` names it."""

    def __init__(self, rank: int, cause: str):
        super().__init__(f"tensor-parallel rank {rank}: {cause}")
        self.rank, self.cause = rank, cause


@dataclass
class WorkerSpec:
    model: str
    world_size: int
    expert_parallel: bool = False
    device_type: str = "cpu"
    dtype: torch.dtype = torch.float32
    index_pattern: object = None
    seed: int = 0
    tokenizer: object = None
    engine_options: dict = field(default_factory=dict)
    timeout_s: float = 600.0  # collectives give up after this (a peer that hangs while alive)


class Worker:
    """What a rank holds; ``collective_rpc`` functions receive it."""

    def __init__(self, rank: int, spec: WorkerSpec, port: int):
        from ..distributed import init_distributed, load_sharded
        from .config import EngineConfig
        from .engine import LLMEngine

        device = f"cuda:{rank}" if spec.device_type == "cuda" else "cpu"
        if spec.device_type == "cpu":
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // spec.world_size))
        self.rank = rank
        self.ctx = init_distributed(rank=rank, world_size=spec.world_size, init_method=f"tcp://127.0.0.1:{port}",
                                    expert_parallel=spec.expert_parallel, device=device, timeout_s=spec.timeout_s)
        self.model, self.load_report = load_sharded(spec.model, self.ctx, dtype=spec.dtype,
                                                    index_pattern=spec.index_pattern, seed=spec.seed)
        self.engine = LLMEngine(self.model, EngineConfig(seed=spec.seed, **spec.engine_options),
                                tokenizer=spec.tokenizer)

    def info(self) -> dict:
        return {"pattern": self.engine.pattern, "vocab_size": self.model.config.vocab_size, "cache_bytes": dict(self.engine.cache_bytes),
                "load": asdict(self.load_report), "pid": os.getpid()}


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


def _worker_main(rank: int, spec: WorkerSpec, port: int, conn) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the driver, which ends the workers
    from ..distributed import shutdown

    try:
        worker = Worker(rank, spec, port)
        conn.send(("ok", worker.info()))
        while True:
            msg = conn.recv()  # EOFError when the driver is gone
            if msg[0] == "close":
                break
            fn, args = msg[1], msg[2]
            conn.send(("ok", fn(worker, *args)))
    except (EOFError, BrokenPipeError):
        pass
    except BaseException as e:  # noqa: BLE001 - sent to the driver, which raises it with the rank
        try:
            conn.send(("error", f"{type(e).__name__}: {e}", traceback.format_exc()))
        except (BrokenPipeError, OSError):
            pass
    finally:
        shutdown()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TPWorkers:
    def __init__(self, spec: WorkerSpec):
        if spec.device_type == "cuda" and torch.cuda.device_count() < spec.world_size:
            raise ValueError(f"tensor_parallel_size={spec.world_size} needs {spec.world_size} GPUs, "
                             f"{torch.cuda.device_count()} visible")
        mpc = mp.get_context("spawn")
        port = _free_port()
        self.procs, self.conns, self._closed = [], [], False
        for rank in range(spec.world_size):
            parent, child = mpc.Pipe()
            p = mpc.Process(target=_worker_main, args=(rank, spec, port, child), daemon=True,
                            name=f"indexcache-tp{rank}")
            p.start()
            child.close()
            self.procs.append(p)
            self.conns.append(parent)
        self._finalizer = weakref.finalize(self, _end, self.procs, self.conns)  # also runs at exit
        self.infos = self._collect()

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def collective_rpc(self, fn, *args) -> list:
        """``fn(worker, *args)`` on every rank (``fn`` importable at module level); the per-rank results."""
        if self._closed:
            raise RuntimeError("the tensor-parallel workers are closed")
        for rank, c in enumerate(self.conns):
            try:
                c.send(("call", fn, args))
            except (BrokenPipeError, OSError):
                self._kill()
                raise WorkerError(rank, self._death(rank)) from None
        return self._collect()

    def _collect(self) -> list:
        results, pending = {}, set(range(len(self.procs)))
        try:
            while pending:
                ready = wait([self.conns[r] for r in pending] + [self.procs[r].sentinel for r in pending], _POLL_S)
                for r in sorted(pending):
                    if self.conns[r] in ready:
                        try:
                            msg = self.conns[r].recv()
                        except (EOFError, OSError):
                            self._fail(r, self._death(r))
                        if msg[0] == "error":
                            self._fail(r, f"raised {msg[1]}\n{msg[2]}")
                        results[r] = msg[1]
                        pending.discard(r)
                    elif self.procs[r].sentinel in ready:
                        self._fail(r, self._death(r))
        except BaseException:  # Ctrl-C or a failed rank: the ranks are out of step, end them all now
            self._kill()
            raise
        return [results[r] for r in range(len(self.procs))]

    def _death(self, rank: int) -> str:
        p = self.procs[rank]
        p.join(timeout=1.0)
        code = p.exitcode
        if code is not None and code < 0:
            return f"died from signal {signal.Signals(-code).name}"
        return f"exited with code {code}" if code is not None else "closed its pipe"

    def _fail(self, rank: int, cause: str):
        raise WorkerError(rank, cause)

    def _kill(self) -> None:
        for p in self.procs:
            if p.is_alive():
                p.kill()
        self.close()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._finalizer()


def _end(procs, conns, grace_s: float = 5.0) -> None:
    for c in conns:
        try:
            c.send(("close",))
        except (BrokenPipeError, OSError):
            pass
    for p in procs:
        p.join(timeout=grace_s)
        if p.is_alive():
            p.kill()
            p.join()
    for c in conns:
        c.close()
