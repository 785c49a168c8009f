"""Quality evaluation on the held-out split of the stdlib corpus:

- held-out LM loss (nats per byte token) and bits per byte;
- long-context retrieval: a simple module-level assignment ``NAME = <literal>`` near the start of a held-out file,
  then (distance ~ the context length) the file's own text and the following held-out files with no other
  mention of NAME, then the query ``\\nNAME = `` at the end. The model must reproduce the literal: accuracy counts
  examples where every byte of it is the argmax under teacher forcing; the mean log-likelihood is reported too;
- per-layer top-k recall: the overlap of the selection a layer actually uses (its own under F, its source's under
  S) with what its own indexer would select, and the share of the layer's dense attention mass that the used
  selection covers.
"""
from __future__ import annotations

import re

import torch
import torch.nn.functional as F

from ..model.attention import selection_mask
from ..model.indexer import Selection, causal_mask
from ..progress import Progress
from .corpus import ByteTokenizer, Corpus
from .overlap import row_overlap
from .ruler import ruler_suite
from .tasks import HELDOUT_SEED_BASE, TASKS
from .trainfwd import attention_qkv, head_mean_probs, lm_loss, over_all_heads

_ASSIGN = re.compile(rb"^[ \t]*([A-Za-z_][A-Za-z0-9_]{2,40}) = ([0-9][0-9_xXa-fA-F.]{0,15}|'[^'\n\\]{1,24}'|"
                     rb"\"[^\"\n\\]{1,24}\")[ \t]*$", re.M)


def retrieval_examples(corpus: Corpus, length: int, n: int, lead: float = 0.125, per_file: int = 8) -> list[dict]:
    """Up to ``n`` examples of exactly ``length`` tokens, deterministic (files in order, ``per_file`` at most each).

    Each example: <bos>, up to ``lead * length`` bytes of the text before an assignment ``NAME = literal``, the
    assignment, then the following text (the rest of the file and the next held-out files) in which NAME does not
    occur, then ``\\nNAME = `` and the literal, which the model is scored on.
    """
    texts = [t for _, t in corpus.texts()]
    sep = b"\x00"  # stands for EOS between files, mapped to the EOS id below
    out = []
    for fi, text in enumerate(texts):
        used = 0
        for m in _ASSIGN.finditer(text):
            if len(out) >= n or used >= per_file:
                break
            name, value = m.group(1), m.group(2)
            query = b"\n" + name + b" = "
            budget = length - 1 - len(query) - len(value)  # 1 for BOS
            pre = min(m.start(), int(lead * length))
            body = text[m.start() - pre: m.end()]
            filler = (text[m.end():] + sep + sep.join(texts[fi + 1: fi + 6]))[: budget - len(body)]
            if len(body) + len(filler) != budget or name in filler or b"\x00" in body:
                continue
            seq = torch.tensor([ByteTokenizer.BOS] + list(body + filler) + list(query + value), dtype=torch.long)
            seq[1:1 + budget] = torch.where(seq[1:1 + budget] == 0, ByteTokenizer.EOS, seq[1:1 + budget])
            out.append({"ids": seq, "value_len": len(value), "name": name.decode(), "value": value.decode(),
                        "file": corpus.files[fi], "distance": len(filler) + len(query)})
            used += 1
        if len(out) >= n:
            break
    return out


@torch.no_grad()
def retrieval_accuracy(model, examples: list[dict], pattern=None, batch: int = 8, device="cpu") -> dict:
    correct, first, ll = 0, 0, 0.0
    for i in range(0, len(examples), batch):
        chunk = examples[i: i + batch]
        ids = torch.stack([e["ids"] for e in chunk]).to(device)
        logits = model(ids[:, :-1], pattern=pattern).logits.float()
        logp = torch.log_softmax(logits, -1)
        for j, e in enumerate(chunk):
            v = e["value_len"]
            tgt = ids[j, -v:]
            lp = logp[j, -v:]
            hit = lp.argmax(-1) == tgt
            correct += int(hit.all())
            first += int(hit[0])
            ll += float(lp.gather(-1, tgt[:, None]).sum())
    n = max(len(examples), 1)
    return {"n": len(examples), "accuracy": correct / n, "first_byte_accuracy": first / n,
            "mean_value_logprob": ll / n}


@torch.no_grad()
def heldout_loss(model, corpus: Corpus, context: int, max_windows: int, pattern=None, batch: int = 4,
                 device="cpu") -> dict:
    ids = corpus.sequential_windows(context + 1, max_windows).to(device)
    nll, n = 0.0, 0
    for chunk in ids.split(batch):
        a, b = lm_loss(model, chunk, pattern)
        nll, n = nll + a, n + b
    loss = nll / max(n, 1)
    return {"loss": loss, "bits_per_byte": loss / 0.6931471805599453, "tokens": n, "context": context}


@torch.no_grad()
def layer_recall(model, ids: torch.Tensor, pattern=None) -> list[dict]:
    """Per layer: used-vs-own-indexer overlap (where the layer has an indexer) and dense attention mass covered."""
    p = model.resolve_pattern(pattern)
    B, T = ids.shape
    pos = torch.arange(T, device=ids.device).expand(B, T)
    h = model.embed(ids)
    cos, sin = model.rope(pos, h.dtype)
    causal = causal_mask(pos, pos)
    k = model.config.index_topk
    keep = (torch.arange(1, T + 1, device=ids.device) > k).expand(B, T)  # queries that see more than k tokens
    out, topk = [], None
    for i, layer in enumerate(model.layers):
        attn = layer.self_attn
        x = layer.input_layernorm(h)
        q, kk, _, q_resid = attention_qkv(attn, x, cos, sin)
        probs = over_all_heads(model, head_mean_probs(q, kk, causal, model.config.softmax_scale))
        own = attn.indexer(x, q_resid, cos, sin, pos) if attn.indexer is not None else None
        h_next, sel = model.run_layer(i, h, cos, sin, pos, topk, p)
        used = sel.topk if isinstance(sel, Selection) else sel  # what this layer attended with
        rec = {"layer": i, "type": str(p)[i], "source": p.source(i)}
        mass = (probs * selection_mask(used, T)).sum(-1)
        rec["attention_mass_used"] = float(mass[keep].mean()) if keep.any() else float(mass.mean())
        if own is not None:
            inter, n = row_overlap(own, used)
            rec["recall_vs_own_indexer"] = float((inter[keep].double() / n[keep].clamp(min=1)).mean()) \
                if keep.any() else 1.0
            rec["attention_mass_own"] = float((probs * selection_mask(own, T)).sum(-1)[keep].mean()) \
                if keep.any() else 1.0
        out.append(rec)
        h, topk = h_next, sel
    return out


def evaluate(model, pattern=None, *, test: Corpus, context: int, lengths=(512,), n_retrieval: int = 32,
             heldout_windows: int = 16, batch: int = 4, recall_seqs: int = 2, device="cpu",
             progress: bool | None = None, suite_lengths=(), suite_n: int = 16, suite_tasks=TASKS,
             suite_seed: int = HELDOUT_SEED_BASE) -> dict:
    """Held-out loss, retrieval at each of ``lengths`` and per-layer recall, for one pattern; with
    ``suite_lengths``, also the RULER-style suite (``res["suite"]``, tools/ruler.py)."""
    p = model.resolve_pattern(pattern)
    res = {"pattern": str(p), "num_full": p.num_full, "num_rerank": p.num_rerank,
           "pool": model.pool_size(p) if p.has_rerank else None}
    if suite_lengths:
        res["suite"] = ruler_suite(model, p, test=test, lengths=suite_lengths, n_per_task=suite_n,
                                   tasks=suite_tasks, seed=suite_seed, batch=batch, device=device,
                                   progress=progress)
    with Progress(2 + len(lengths), f"eval {p}", " parts", progress) as bar:
        res["heldout"] = heldout_loss(model, test, context, heldout_windows, p, batch, device)
        bar.update()
        res["retrieval"] = {}
        for L in lengths:
            ex = retrieval_examples(test, L, n_retrieval)
            res["retrieval"][str(L)] = retrieval_accuracy(model, ex, p, batch, device)
            bar.update()
        ids = test.sequential_windows(context, recall_seqs).to(device)
        res["layers"] = layer_recall(model, ids, p)
        bar.update()
    return res
