"""A RULER-style retrieval suite: held-out synthetic tasks (tools/tasks.py) at several lengths, scored by exact
match of the greedily decoded answer.

Greedy decoding through the model's own forward produces exactly the answer iff, with the answer fed in (teacher
forcing), the argmax at every answer position is the answer's byte: both decode the same prefix until the first
miss. So one forward per batch scores an item (``greedy_decode`` is the step-by-step form; a test checks that both
agree). The decoded text up to and including the first wrong byte is reported with each item.
"""
from __future__ import annotations

import torch

from ..progress import Progress
from .corpus import ByteTokenizer, Corpus
from .tasks import HELDOUT_SEED_BASE, TASKS, TaskItem, make_items

DEFAULT_LENGTHS = (2048, 4096, 8192, 16384)


@torch.no_grad()
def greedy_decode(model, prompt: list[int], n: int, pattern=None, device="cpu") -> list[int]:
    """``n`` tokens decoded greedily, one full forward per token (the model has no cache; reference use only)."""
    ids = torch.tensor([prompt], dtype=torch.long, device=device)
    out = []
    for _ in range(n):
        nxt = int(model(ids, pattern=pattern).logits[0, -1].argmax())
        out.append(nxt)
        ids = torch.cat([ids, ids.new_tensor([[nxt]])], 1)
    return out


@torch.no_grad()
def score_items(model, items: list[TaskItem], pattern=None, batch: int = 4, device="cpu") -> list[dict]:
    """Per item: exact match of the greedy answer, first-byte match, and the greedy text until its first miss."""
    out = []
    for i in range(0, len(items), batch):
        chunk = items[i: i + batch]
        if len({it.length for it in chunk}) != 1:
            raise ValueError("score_items: items of one batch must have the same length")
        ids = torch.stack([it.ids() for it in chunk]).to(device)
        pred = model(ids[:, :-1], pattern=pattern).logits.argmax(-1)
        for j, it in enumerate(chunk):
            a = len(it.answer)
            want, got = ids[j, -a:], pred[j, -a:]
            hit = (want == got).tolist()
            miss = hit.index(False) if False in hit else a
            out.append({"task": it.task, "length": it.length, "exact": miss == a, "first_byte": bool(hit[0]),
                        "answer": it.answer.decode("utf-8", "replace"), "greedy": ByteTokenizer().decode(got[: miss + 1].tolist())})
    return out


def _check_args(lengths, n_per_task: int, tasks, seed: int) -> None:
    if not lengths:
        raise ValueError("the retrieval suite needs at least one length")
    for L in lengths:
        if isinstance(L, bool) or not isinstance(L, int) or L < 256:
            raise ValueError(f"retrieval suite lengths must be integers >= 256, got {L!r}")
    if isinstance(n_per_task, bool) or not isinstance(n_per_task, int) or n_per_task < 1:
        raise ValueError(f"items per task must be an integer >= 1, got {n_per_task!r}")
    bad = [t for t in tasks if t not in TASKS]
    if bad or not tasks:
        raise ValueError(f"unknown retrieval tasks {bad or tasks!r}; tasks are {TASKS}")
    if seed < HELDOUT_SEED_BASE:
        raise ValueError(f"the suite evaluates held-out items: seed must be >= {HELDOUT_SEED_BASE}, got {seed}")


def ruler_suite(model, pattern=None, *, test: Corpus, lengths=DEFAULT_LENGTHS, n_per_task: int = 16,
                tasks=TASKS, seed: int = HELDOUT_SEED_BASE, batch: int = 4, device="cpu",
                progress: bool | None = None, keep_items: bool = False) -> dict:
    """Exact-match retrieval per task and length (held-out items), plus the mean over tasks per length."""
    lengths, tasks = tuple(lengths), tuple(tasks)
    _check_args(lengths, n_per_task, tasks, seed)
    res = {"seed": seed, "n_per_task": n_per_task, "lengths": list(lengths), "tasks": {t: {} for t in tasks},
           "mean_by_length": {}}
    items_out = []
    with Progress(len(lengths) * len(tasks), "retrieval suite", " task-lengths", progress) as bar:
        for L in lengths:
            accs = []
            for t in tasks:
                scored = score_items(model, make_items(test, (t,), L, n_per_task, seed, heldout=True), pattern,
                                     max(1, batch), device)
                acc = sum(s["exact"] for s in scored) / len(scored)
                res["tasks"][t][str(L)] = {"n": len(scored), "exact_match": acc,
                                           "first_byte": sum(s["first_byte"] for s in scored) / len(scored)}
                accs.append(acc)
                items_out += scored
                bar.update(note=f"{t}@{L} {acc:.2f}")
            res["mean_by_length"][str(L)] = sum(accs) / len(accs)
    if keep_items:
        res["items"] = items_out
    return res
