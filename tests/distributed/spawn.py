"""Run a function on N gloo ranks in spawned processes (a deadline; every process joined or killed; a failing
rank's traceback raised here)."""
from __future__ import annotations

import threading

from indexcache.distributed.launch import RankProcesses


def run_ranks(fn, *args, world: int = 2, timeout: float = 120.0) -> list:
    """[fn(ctx_rank0, *args), ...]; ``fn`` must be importable (module level)."""
    ranks = RankProcesses(world, timeout_s=60)
    timer = threading.Timer(timeout, ranks._kill)  # a hang ends as a WorkerError naming a killed rank
    timer.start()
    try:
        return ranks.collective_rpc(fn, *args)
    finally:
        timer.cancel()
        ranks.close()
