"""Functions the spawned ranks run (module level, so spawn can import them). Results are numpy/python values:
tensors shared through the queue would die with the process that sent them."""
from __future__ import annotations

import dataclasses

import torch


def greedy(model, ids: torch.Tensor, steps: int) -> list[list[int]]:
    """Greedy continuation by full recomputation (the model's own forward, as the tools run it)."""
    out = ids
    for _ in range(steps):
        nxt = model(out).logits[:, -1].argmax(-1, keepdim=True)
        out = torch.cat([out, nxt], 1)
    return out[:, ids.shape[1]:].tolist()


def sharded_outputs(ctx, cases):
    """Per case (model, pattern, expert parallel, ids, greedy steps, weight dtype): logits, greedy tokens,
    bytes read."""
    from indexcache.distributed import load_sharded

    results = []
    for model_path, pattern, ep, ids, steps, weight_dtype in cases:
        model, report = load_sharded(model_path, dataclasses.replace(ctx, expert_parallel=ep), index_pattern=pattern,
                                     seed=4, weight_dtype=weight_dtype)
        with torch.no_grad():
            logits = model(ids).logits
            tokens = greedy(model, ids, steps)
        results.append({"logits": logits.numpy(), "tokens": tokens, "bytes_read": report.bytes_read})
    return results


def raise_on_rank(worker, rank: int):
    """A failure on one rank while the others wait for it in a collective."""
    if worker.rank == rank:
        raise RuntimeError(f"boom on rank {rank}")
    torch.distributed.barrier()


def pid_then_collective(worker):
    """Every rank waits in a collective for a long time (until the test kills one of them)."""
    import time

    time.sleep(0.1 if worker.rank else 60)
    torch.distributed.barrier()


def random_shard_replicas(ctx):
    """A random shard: the replicated weights must be equal on every rank (checked by the caller)."""
    from indexcache.distributed import random_shard
    from indexcache.presets import preset_config

    model = random_shard(preset_config("tiny"), ctx, torch.float32, seed=1)
    return {n: p.detach().numpy() for n, p in model.named_parameters()}
