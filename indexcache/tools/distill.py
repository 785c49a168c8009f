"""Training-aware multi-layer distillation (IndexCache, arXiv 2603.12201).

For a target pattern, every retained F indexer learns the averaged attention distribution of itself and the S
layers it serves: L_multi = sum_j 1/(m+1) KL(p^(l+j) || q^(l)). Two stages as in DSA: a dense warm-up (only the F
indexers train; targets over all causal tokens), then a sparse stage (top-k on, the F layer's selection is used by
all the layers it serves; the KL is over that selection; the indexer input is detached; LM loss trains the rest).
The result is saved without the S layers' indexer weights (config.json carries the pattern).

On N tensor-parallel ranks (``parallel``) each rank trains its shard: the targets (head-averaged attention) are
summed over the ranks' heads by one all-reduce, so the replicated indexers see the same loss and take the same
steps on every rank; the LM loss trains the shards through differentiable collectives (distributed/training.py).
Rank 0 gathers the whole model and writes it.

Re-rank (R) layers (beyond the paper) train like F layers on their own group (themselves and the S layers after
them), over their own selection inside the F layer's candidate pool in the sparse stage.
"""
from __future__ import annotations

import time

import torch

from ..checkpoint import build_empty, load_model, save_checkpoint
from ..pattern import IndexPattern
from .corpus import ByteTokenizer, load_corpus
from .train import TrainConfig, run_stage


def distill(model_path: str, pattern, out_dir: str | None = None, *, warmup_steps: int = 50, sparse_steps: int = 50,
            warmup_lr: float = 1e-3, sparse_lr: float = 3e-4, batch: int = 8, context: int | None = None,
            seed: int = 0, device="cpu", time_budget_s: float | None = None, max_train_bytes: int | None = None,
            progress: bool | None = None, task_ratio: float = 0.0, tasks_packed: bool = False,
            task_tokens_per_episode: int = 256, task_share: float = 0.5, parallel=None,
            index_rows: int | None = None, task_weights=None) -> tuple:
    """Distil ``model_path`` (an all-F DSA checkpoint) into ``pattern``. Returns (model, log); with ``parallel``
    (a ``ParallelContext`` of several ranks) the model is this rank's shard.
    ``task_ratio``: share of windows that are synthetic retrieval tasks (as in training, tools/tasks.py);
    ``tasks_packed``: those windows hold many episodes each (``packed_window``, one per
    ``task_tokens_per_episode`` tokens filling at most ``task_share`` of it); ``index_rows``: query rows per window
    the indexer loss covers (TrainConfig.index_rows; None: all); ``task_weights``: the tasks' draw weights
    (TrainConfig.task_weights)."""
    if parallel is not None and not parallel.is_single:
        from ..distributed import load_sharded
        model = load_sharded(model_path, parallel, index_pattern=pattern, weight_dtype="bf16")[0]
    else:
        model = load_model(model_path, device=torch.device(device), index_pattern=pattern,
                           weight_dtype="bf16")  # fp32 maths, trains
    p = model.config.pattern
    cfg = model.config
    ctx = context or _trained_context(model_path) or 512
    tc = TrainConfig(context=ctx, batch=batch, seed=seed, task_ratio=task_ratio, tasks_packed=tasks_packed,
                     task_tokens_per_episode=task_tokens_per_episode, task_share=task_share, index_rows=index_rows,
                     task_weights=task_weights)
    corpus = load_corpus("train", max_bytes=max_train_bytes)
    gen = torch.Generator().manual_seed(seed + 1)
    t0 = time.perf_counter()
    logs = []
    for stage, steps, lr, share in (("warmup", warmup_steps, warmup_lr, 0.5), ("sparse", sparse_steps, sparse_lr, 1.0)):
        deadline = None if time_budget_s is None else t0 + share * time_budget_s
        logs.append(run_stage(model, corpus, stage, steps, lr, tc, gen, pattern=p, deadline=deadline,
                              progress=progress))
    log = {"pattern": str(p), "groups": {f: p.served_by(f) for f in p.indexer_layers}, "stages": logs,
           "rerank": {f: p.reranked_by(f) for f in p.full_layers if p.reranked_by(f)},
           "context": ctx, "seconds": time.perf_counter() - t0, "source": model_path}
    if out_dir:
        _save(model, out_dir, extra_config={
            "tokenizer": ByteTokenizer.description(),
            "distillation": {"source": model_path, "pattern": str(p),
                             "steps_done": {s["stage"]: s["steps_done"] for s in logs}}})
    assert cfg.pattern == p
    return model, log


def _save(model, out_dir: str, extra_config: dict) -> None:
    """Write the model; a shard is gathered whole on rank 0, which alone writes (the others wait for it)."""
    ctx = getattr(model, "parallel", None)
    if ctx is None or ctx.is_single:
        save_checkpoint(model, out_dir, extra_config=extra_config)
        return
    from ..distributed.training import barrier, gather_full_state

    state = gather_full_state(model)
    if state is not None:
        full = build_empty(model.config, "cpu", torch.float32)
        with torch.no_grad():
            for name, t in list(full.named_parameters()) + list(full.named_buffers()):
                if not name.startswith("rotary."):
                    t.copy_(state[name])
        save_checkpoint(full, out_dir, extra_config=extra_config)
    barrier(ctx)


def _trained_context(path: str) -> int | None:
    import json
    import os

    try:
        with open(os.path.join(path, "config.json")) as f:
            return int(json.load(f)["training"]["train_config"]["context"])
    except (OSError, KeyError, TypeError, ValueError):
        return None


__all__ = ["distill", "IndexPattern"]
