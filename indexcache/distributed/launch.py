"""N rank processes driven from this one: spawned, joined to a process group, called over pipes, watched.

Each rank runs ``setup(ctx, *setup_args)`` once (loading its shard, say) and then answers calls ``fn(state, *args)``
from the driver. The driver waits on every pipe and every process sentinel at once: a rank that raises or dies makes
it raise ``WorkerError`` naming the rank and the cause and kill the other ranks (they may be blocked in a collective
with the lost one) within about a second. ``close()`` — also run on garbage collection and at exit — ends them all.
"""
from __future__ import annotations

import os
import signal
import socket
import sys
import traceback
import weakref
from multiprocessing.connection import wait

import torch
import torch.multiprocessing as mp

from .context import init_distributed, shutdown

_POLL_S = 0.5


class WorkerError(RuntimeError):
    """A rank process raised or died; ``rank`` names it."""

    def __init__(self, rank: int, cause: str):
        super().__init__(f"tensor-parallel rank {rank}: {cause}")
        self.rank, self.cause = rank, cause


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _identity(ctx):
    return ctx


def _rank_main(rank, world, port, conn, device_type, expert_parallel, timeout_s, setup, setup_args):
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the driver, which ends the ranks
    code = 0
    try:
        device = f"cuda:{rank}" if device_type == "cuda" else "cpu"
        if device_type == "cpu":  # ranks share the cores
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
        ctx = init_distributed(rank=rank, world_size=world, init_method=f"tcp://127.0.0.1:{port}",
                               expert_parallel=expert_parallel, device=device, timeout_s=timeout_s)
        state = setup(ctx, *setup_args)
        conn.send(("ok", getattr(state, "info", lambda: None)()))
        while True:
            msg = conn.recv()  # EOFError when the driver is gone
            if msg[0] == "close":
                break
            conn.send(("ok", msg[1](state, *msg[2])))
    except (EOFError, BrokenPipeError):
        pass
    except BaseException as e:  # noqa: BLE001 - sent to the driver, which raises it with the rank
        code = 1
        try:
            conn.send(("error", f"{type(e).__name__}: {e}", traceback.format_exc()))
        except (BrokenPipeError, OSError):
            pass
    shutdown()
    # exit now: the interpreter's teardown (torch, Triton, gloo threads) takes seconds on a loaded machine
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


class RankProcesses:
    """``world`` spawned ranks (GPU ``rank`` each when ``device_type`` is cuda, gloo on CPU)."""

    def __init__(self, world: int, setup=_identity, setup_args: tuple = (), *, device_type: str = "cpu",
                 expert_parallel: bool = False, timeout_s: float = 600.0):
        if device_type == "cuda" and torch.cuda.device_count() < world:
            raise ValueError(f"tensor_parallel_size={world} needs {world} GPUs, {torch.cuda.device_count()} visible")
        mpc = mp.get_context("spawn")
        port = free_port()
        self.procs, self.conns, self._closed = [], [], False
        for rank in range(world):
            parent, child = mpc.Pipe()
            p = mpc.Process(target=_rank_main, daemon=True, name=f"indexcache-rank{rank}",
                            args=(rank, world, port, child, device_type, expert_parallel, timeout_s, setup, setup_args))
            p.start()
            child.close()
            self.procs.append(p)
            self.conns.append(parent)
        self._finalizer = weakref.finalize(self, _end, self.procs, self.conns)  # also runs at exit
        self.infos = self._collect()  # what each rank's state.info() returned after setup

    @property
    def closed(self) -> bool:
        """Closed by ``close()``, or after a rank failed (all were ended then)."""
        return self._closed

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def collective_rpc(self, fn, *args) -> list:
        """``fn(state, *args)`` on every rank (``fn`` importable at module level); the per-rank results."""
        if self._closed:
            raise RuntimeError("the tensor-parallel workers are closed")
        for rank, c in enumerate(self.conns):
            try:
                c.send(("call", fn, args))
            except (BrokenPipeError, OSError):
                cause = self._death(rank)
                self._kill()
                raise WorkerError(rank, cause) from None
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
                            raise WorkerError(r, self._death(r)) from None
                        if msg[0] == "error":
                            raise WorkerError(r, f"raised {msg[1]}\n{msg[2]}")
                        results[r] = msg[1]
                        pending.discard(r)
                    elif self.procs[r].sentinel in ready:
                        raise WorkerError(r, self._death(r))
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
