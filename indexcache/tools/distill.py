"""Training-aware multi-layer distillation (IndexCache, arXiv 2603.12201).

For a target pattern, every retained F indexer learns the averaged attention distribution of itself and the S
layers it serves: L_multi = sum_j 1/(m+1) KL(p^(l+j) || q^(l)). Two stages as in DSA: a dense warm-up (only the F
indexers train; targets over all causal tokens), then a sparse stage (top-k on, the F layer's selection is used by
all the layers it serves; the KL is over that selection; the indexer input is detached; LM loss trains the rest).
The result is saved without the S layers' indexer weights (config.json carries the pattern).

Re-rank (R) layers (beyond the paper) train like F layers on their own group (themselves and the S layers after
them), over their own selection inside the F layer's candidate pool in the sparse stage.
"""
from __future__ import annotations

import time

import torch

from ..checkpoint import load_model, save_checkpoint
from ..pattern import IndexPattern
from .corpus import ByteTokenizer, load_corpus
from .train import TrainConfig, run_stage


def distill(model_path: str, pattern, out_dir: str | None = None, *, warmup_steps: int = 50, sparse_steps: int = 50,
            warmup_lr: float = 1e-3, sparse_lr: float = 3e-4, batch: int = 8, context: int | None = None,
            seed: int = 0, device="cpu", time_budget_s: float | None = None, max_train_bytes: int | None = None,
            progress: bool | None = None, task_ratio: float = 0.0) -> tuple:
    """Distil ``model_path`` (an all-F DSA checkpoint) into ``pattern``. Returns (model, log).
    ``task_ratio``: share of windows that are synthetic retrieval tasks (as in training, tools/tasks.py)."""
    device = torch.device(device)
    model = load_model(model_path, device=device, index_pattern=pattern, weight_dtype="bf16")  # fp32 maths, trains
    p = model.config.pattern
    cfg = model.config
    ctx = context or _trained_context(model_path) or 512
    tc = TrainConfig(context=ctx, batch=batch, seed=seed, task_ratio=task_ratio)
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
        save_checkpoint(model, out_dir, extra_config={
            "tokenizer": ByteTokenizer.description(),
            "distillation": {"source": model_path, "pattern": str(p),
                             "steps_done": {s["stage"]: s["steps_done"] for s in logs}}})
    assert cfg.pattern == p
    return model, log


def _trained_context(path: str) -> int | None:
    import json
    import os

    try:
        with open(os.path.join(path, "config.json")) as f:
            return int(json.load(f)["training"]["train_config"]["context"])
    except (OSError, KeyError, TypeError, ValueError):
        return None


__all__ = ["distill", "IndexPattern"]
