"""The copy probe: can a model copy a random string it saw earlier in its context?

Retrieval needs induction (find where the current text occurred before, continue as it did then). A model without
it scores every retrieval task at 0 however its sparse attention selects, so the probe separates "the model cannot
copy" from "the indexer does not find the fact". Each probe window is held-out code with a random hex string written
twice, ``distance`` tokens apart; the score is the mean NLL of the second copy after its first ``cue`` bytes,
against ln 16 (a model that knows the string is hex but cannot copy it).
"""
from __future__ import annotations

import math
import random

import torch
import torch.nn.functional as F

from .corpus import ByteTokenizer, Corpus
from .tasks import COPY_ALPHABET, COPY_SEGMENT, copy_episode_spans
from .trainfwd import dense_logits

HEX_CHANCE = math.log(16)


@torch.no_grad()
def copy_probe(model, corpus: Corpus, *, length: int = 1024, distances=(64, 300, 800), per_distance: int = 4,
               span: int = 32, cue: int = 4, seed: int = 0, pattern=None, device="cpu", dense: bool = False) -> dict:
    """Mean NLL (nats) of the copied bytes per distance and overall, with ``chance`` = ln 16.

    ``dense``: every layer attends to all earlier tokens (trainfwd.dense_logits; ``pattern`` unused), for a model
    whose indexers are not trained yet: their top-k would hide most of the copy's source at random."""
    if length < 2 * span + max(distances) + 2:
        raise ValueError(f"copy probe: length {length} is too short for distance {max(distances)} and span {span}")
    if not 0 <= cue < span:
        raise ValueError(f"copy probe: cue must be in [0, span={span}), got {cue}")
    rng = random.Random(f"copy-probe:{seed}")
    rows, spans = [], []
    for d in distances:
        for _ in range(per_distance):
            start = rng.randrange(0, max(1, len(corpus) - length - 1))
            raw = [10 if t >= 256 else t for t in corpus.tokens[start: start + length - 1].tolist()]
            s = [ord(c) for c in "".join(rng.choice("0123456789abcdef") for _ in range(span))]
            a = rng.randrange(1, length - 1 - span - d - span)
            raw[a: a + span] = s
            raw[a + d + span: a + d + 2 * span] = s
            rows.append([ByteTokenizer.BOS] + raw)
            spans.append((d, a + d + span + 1))  # the second copy's first byte, in row coordinates
    ids = torch.tensor(rows, device=device)
    logits = (dense_logits(model, ids[:, :-1]) if dense else model(ids[:, :-1], pattern=pattern).logits).float()
    nll = F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")  # nll[:, p] predicts ids[:, p+1]
    by_d: dict[int, list[float]] = {}
    for row, (d, b) in zip(nll, spans):
        by_d.setdefault(d, []).append(float(row[b - 1 + cue: b - 1 + span].mean()))
    means = {str(d): sum(v) / len(v) for d, v in by_d.items()}
    return {"nll_by_distance": means, "nll": sum(means.values()) / len(means), "chance": HEX_CHANCE,
            "span": span, "cue": cue, "length": length}


REACH_SEED_BASE = 1 << 42  # copy windows drawn by training take seeds below 2^31: these are held out


@torch.no_grad()
def copy_reach(model, length: int, *, windows: int = 8, every: int = 64, gaps: str = "log",
               alphabet: bytes = COPY_ALPHABET, cue: int = 4, batch: int = 4) -> float:
    """Mean NLL (nats) of the copied letters past each copy's first ``cue`` in held-out long copy windows of
    ``length`` tokens (``tasks.copy_episode_spans``: one copy per ``every`` tokens, copy distances spread over the
    whole window as ``gaps`` says), dense attention. Chance is ln(alphabet size) (3.26 for the letters); a model
    that copies at every distance up to ``length`` scores near 0. Whether the copy warm-up formed an induction
    copier that reaches across the window: it forms in a phase change late in the stage, and a model still
    copying only a few dozen tokens back cannot retrieve."""
    if windows < 1 or length < 4 * every:
        raise ValueError(f"copy reach: need windows >= 1 and length >= 4 x every ({4 * every}), got windows "
                         f"{windows}, length {length}")
    rows = [copy_episode_spans(length + 1, REACH_SEED_BASE + i, every, length - 2 * COPY_SEGMENT, alphabet=alphabet,
                               gaps=gaps) for i in range(windows)]
    return copied_nll(model, rows, cue=cue, batch=batch)


@torch.no_grad()
def copied_nll(model, rows, *, cue: int = 4, batch: int = 4) -> float:
    """Mean NLL (nats) of the copied tokens past each copy's first ``cue``, dense attention (bf16 autocast on a
    GPU), ``batch`` rows a forward. ``rows``: [(window int64 [L], [(source, destination, length), ...])] as the
    copy-window makers of ``tasks`` return them, all windows of one batch the same length."""
    device = next(model.parameters()).device
    picked = []
    for c in range(0, len(rows), batch):
        part = rows[c: c + batch]
        ids = torch.stack([w for w, _ in part]).to(device)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = dense_logits(model, ids[:, :-1])
        nll = F.cross_entropy(logits.float().transpose(1, 2), ids[:, 1:], reduction="none")
        for i, (_, spans) in enumerate(part):  # nll[:, p] predicts ids[:, p + 1]
            picked += [nll[i, dst + cue - 1: dst + n - 1] for _, dst, n in spans]
    return float(torch.cat(picked).mean())
