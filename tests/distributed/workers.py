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


def training_grads(ctx, cases):
    """Per case (model, pattern, expert parallel, ids): the weights gathered whole, and the gradients of one sparse
    training step (indexer KL + LM loss, as distill runs it) made one-process by ``reduce_gradients`` and gathered
    whole, with their global norm; on rank 0 (None elsewhere)."""
    from indexcache.distributed import load_sharded
    from indexcache.distributed.training import clip_grad_norm_, gather_full_state, reduce_gradients
    from indexcache.tools.trainfwd import forward_train

    results = []
    for model_path, pattern, ep, ids in cases:
        model, _ = load_sharded(model_path, dataclasses.replace(ctx, expert_parallel=ep), index_pattern=pattern,
                                seed=4)
        weights = gather_full_state(model)
        params = list(model.parameters())
        for p in params:
            p.requires_grad_(True)
        lm, _ = forward_train(model, ids, "sparse")
        lm.backward()
        reduce_gradients(model, params)
        norm = float(clip_grad_norm_(model, params, 1e9))  # large: the norm only
        with torch.no_grad():
            for p in params:
                p.data = p.grad if p.grad is not None else torch.zeros_like(p)
        grads = gather_full_state(model)
        results.append(None if grads is None else {
            "weights": {k: v.numpy() for k, v in weights.items()}, "norm": norm,
            "grads": {k: v.numpy() for k, v in grads.items() if not k.endswith("e_score_correction_bias")}})
    return results


def outputs_and_grads(ctx, cases, train_cases):
    """Both of the above on the same ranks (one process start-up)."""
    return sharded_outputs(ctx, cases), training_grads(ctx, train_cases)
