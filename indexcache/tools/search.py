"""The paper's training-free greedy layer selection (IndexCache, arXiv 2603.12201), with a cached prefix.

Start from all-F; layer 0 (and any ``fixed`` layer) stays F. Each step tries every remaining F layer as S, on the
same calibration batches, and commits the one with the lowest LM loss, until ``target_shared`` layers are S.

Cheaper than the naive search: turning layer l into S leaves the hidden states (and the top-k in flight) before
layer l unchanged. For the current pattern we keep, per calibration batch, the input of every layer and the top-k
entering it, so a candidate resumes at layer l (N - l layer-forwards instead of N). After a step commits l*, the
cache is refreshed from l* on. ``naive=True`` runs every candidate from the embedding (the reference the cached
search is tested against). Layer-forwards are counted both ways.

Beyond the paper, ``max_rerank`` > 0 lets each step also try turning a layer into R (a re-rank layer, see
indexcache/pattern.py), with at most that many R layers in the result; the step commits the (layer, S or R) with
the lowest loss. A trial that adds the first R layer runs from the embedding (the cached prefix carries no
candidate pools yet); once an R layer is committed, the cache carries them and trials resume as above.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..pattern import IndexPattern, PatternError
from ..progress import Progress


@dataclass
class SearchResult:
    pattern: IndexPattern
    steps: list[dict]  # per step: layer turned S, loss after, the pattern, candidate losses
    base_loss: float
    layer_forwards: int
    naive_layer_forwards: int
    seconds: float
    tokens: int
    naive: bool = False
    patterns_by_num_full: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"pattern": str(self.pattern), "num_full": self.pattern.num_full, "num_layers": len(self.pattern),
                "base_loss": self.base_loss, "final_loss": self.steps[-1]["loss"] if self.steps else self.base_loss,
                "loss_curve": [self.base_loss] + [s["loss"] for s in self.steps],
                "steps": self.steps, "engine_flags": self.pattern.engine_flags(),
                "layer_forwards": self.layer_forwards, "naive_layer_forwards": self.naive_layer_forwards,
                "layer_forwards_saved": self.naive_layer_forwards - self.layer_forwards,
                "cached_prefix": not self.naive, "calibration_tokens": self.tokens, "seconds": self.seconds,
                "patterns_by_num_full": {str(k): str(v) for k, v in self.patterns_by_num_full.items()}}


class _Runner:
    """Runs layer ranges of the model on fixed calibration batches and counts layer-forwards."""

    def __init__(self, model, batches: list[torch.Tensor]):
        self.model, self.batches, self.forwards = model, batches, 0
        self.ctx = []
        for ids in batches:
            B, T = ids.shape
            inp = ids[:, :-1]
            pos = torch.arange(T - 1, device=ids.device).expand(B, T - 1)
            h = model.embed(inp)
            cos, sin = model.rope(pos, h.dtype)
            self.ctx.append((h, cos, sin, pos, ids[:, 1:]))
        self.tokens = sum(int(ids[:, 1:].numel()) for ids in batches)

    def run(self, b: int, pattern: IndexPattern, start: int, h, topk, cache: list | None = None) -> float:
        """Layers start..N-1 of batch b from (h, topk); returns the summed NLL. Fills ``cache`` with
        (layer input, top-k entering the layer) for every layer >= start when given."""
        _, cos, sin, pos, target = self.ctx[b]
        for i in range(start, len(self.model.layers)):
            if cache is not None:
                cache[i] = (h, topk)
            h, topk = self.model.run_layer(i, h, cos, sin, pos, topk, pattern)
            self.forwards += 1
        logits = self.model.head(h).float()
        return float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="sum"))


@torch.no_grad()
def greedy_search(model, batches: list[torch.Tensor], target_shared: int, *, fixed=(0,), naive: bool = False,
                  progress: bool | None = None, max_rerank: int = 0, pool: int | None = None) -> SearchResult:
    """Greedy search for ``target_shared`` S (or, with ``max_rerank``, R) layers; ``batches`` are [B, T+1] token
    tensors (inputs + targets). ``pool``: the candidate pool of R layers (default 4 x top-k).

    Losses are mean next-token cross-entropy (nats) over all calibration tokens. Ties go to the lower layer
    (then to S).
    """
    N = len(model.layers)
    base = model.resolve_pattern(None)
    if base.num_full != N:
        raise PatternError(f"greedy search starts from all-F; this model has indexers only at {base.full_layers}")
    fixed = set(fixed) | {0}
    candidates = [i for i in range(N) if i not in fixed]
    if not 0 <= target_shared <= len(candidates):
        raise ValueError(f"target_shared must be in [0, {len(candidates)}] (layers {sorted(fixed)} stay F), "
                         f"got {target_shared}")
    if isinstance(max_rerank, bool) or not isinstance(max_rerank, int) or max_rerank < 0:
        raise ValueError(f"max_rerank must be an integer >= 0, got {max_rerank!r}")
    t0 = time.perf_counter()
    run = _Runner(model, batches)
    pattern = IndexPattern.all_full(N).with_pool(pool)
    caches = [[None] * N for _ in batches]
    base_nll = sum(run.run(b, pattern, 0, run.ctx[b][0], None, None if naive else caches[b])
                   for b in range(len(batches)))
    base_loss = base_nll / run.tokens
    naive_count = N * len(batches)
    steps, by_full = [], {N: pattern}
    total = sum(len(candidates) - s for s in range(target_shared)) * (2 if max_rerank else 1)
    with Progress(total, "greedy search", " candidates", progress) as bar:
        for step in range(target_shared):
            losses = {}
            letters = ("S", "R") if pattern.num_rerank < max_rerank else ("S",)
            for layer in candidates:
                for letter in letters:
                    trial = pattern.with_shared(layer) if letter == "S" else pattern.with_rerank(layer)
                    resume = not naive and trial.has_rerank == pattern.has_rerank
                    nll = 0.0
                    for b in range(len(batches)):
                        if resume:
                            h, topk = caches[b][layer]
                            nll += run.run(b, trial, layer, h, topk)
                        else:
                            nll += run.run(b, trial, 0, run.ctx[b][0], None)
                    naive_count += N * len(batches)
                    losses[(layer, letter)] = nll / run.tokens
                    bar.update(note=f"step {step + 1}/{target_shared}")
            best, letter = min(losses, key=lambda x: (losses[x], x[0], x[1] == "R"))
            changed_carrier = letter == "R" and not pattern.has_rerank
            pattern = pattern.with_shared(best) if letter == "S" else pattern.with_rerank(best)
            candidates.remove(best)
            if not naive:  # refresh the cache of the committed pattern from the changed layer on
                start = 0 if changed_carrier else best
                for b in range(len(batches)):
                    h, topk = (run.ctx[b][0], None) if start == 0 else caches[b][start]
                    run.run(b, pattern, start, h, topk, caches[b])
            by_full[pattern.num_full] = pattern
            steps.append({"step": step + 1, "layer": best, "type": letter, "loss": losses[(best, letter)],
                          "pattern": str(pattern),
                          "candidate_losses": {f"{k}{'' if t == 'S' else 'R'}": v
                                               for (k, t), v in sorted(losses.items())}})
    return SearchResult(pattern, steps, base_loss, run.forwards, naive_count, time.perf_counter() - t0, run.tokens,
                        naive, by_full)


def calibration_batches(corpus, num_seqs: int, length: int, batch_size: int, seed: int = 0, device="cpu"):
    """Fixed calibration windows (inputs + next-token targets) drawn once from ``corpus``."""
    g = torch.Generator().manual_seed(seed)
    ids = corpus.random_windows(num_seqs, length + 1, g).to(device)
    return list(ids.split(batch_size))
