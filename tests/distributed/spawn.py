"""Run a function on N gloo ranks in spawned processes: a free port, a deadline, every process joined or killed,
and a failing rank's traceback raised in the test process."""
from __future__ import annotations

import os
import queue
import socket
import time
import traceback

import torch
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(fn, rank, world, port, out, args):
    from indexcache.distributed import init_distributed, shutdown

    torch.set_num_threads(1)
    try:
        ctx = init_distributed(rank=rank, world_size=world, init_method=f"tcp://127.0.0.1:{port}", backend="gloo",
                               device="cpu", timeout_s=60)
        out.put((rank, True, fn(ctx, *args)))
    except BaseException:  # noqa: BLE001 - reported to the test process
        out.put((rank, False, traceback.format_exc()))
    finally:
        shutdown()


def run_ranks(fn, *args, world: int = 2, timeout: float = 120.0) -> list:
    """[fn(ctx_rank0, *args), fn(ctx_rank1, *args), ...]; ``fn`` must be importable (module level)."""
    mp_ctx = mp.get_context("spawn")
    out = mp_ctx.Queue()
    port = free_port()
    os.environ.setdefault("TRITON_INTERPRET", "1")
    procs = [mp_ctx.Process(target=_entry, args=(fn, r, world, port, out, args), daemon=True) for r in range(world)]
    for p in procs:
        p.start()
    results, deadline = {}, time.monotonic() + timeout
    try:
        while len(results) < world:
            if time.monotonic() > deadline:
                raise TimeoutError(f"ranks {sorted(set(range(world)) - set(results))} did not finish in {timeout}s")
            try:
                rank, ok, value = out.get(timeout=0.5)
            except queue.Empty:
                dead = [r for r, p in enumerate(procs) if r not in results and p.exitcode not in (None, 0)]
                if dead:
                    raise RuntimeError(f"rank {dead[0]} exited with code {procs[dead[0]].exitcode} without a result")
                continue
            if not ok:
                raise RuntimeError(f"rank {rank} failed:\n{value}")
            results[rank] = value
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join()
    return [results[r] for r in range(world)]
