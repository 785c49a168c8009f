"""Why does the copy stage's copying stop working once more tokens precede the copy, and which training makes it
work at any position? CPU, minutes per run.

Trains a small model of the testbed's architecture (the retrieval preset's initialisation and optimiser, dense
attention as in the copy stage, ``tools/trainfwd.forward_train``) on letter windows, then measures with dense
attention (the copy stage never trains the indexer, so its top-k is random):

- copied letters' NLL after a 4-letter cue (chance ln 26 = 3.26) on (a) copy windows of L tokens
  (``tasks.copy_window_spans``: the copy distance grows with L) and (b) 64-token copy windows with L - 64 random
  letters inserted after ``<bos>`` (the same copy distance, more tokens before it); with ``--eval-distances``
  also (c) the long phase's own windows of those lengths (one copy per 64 tokens, log-uniform distances, held-out
  seeds) by copy distance (12-31, 32-63, 64-127, ...): how far the copying reaches ((a) holds one copy at ~0.4 L);
  with ``--competitors`` also (d) in those windows the copied tokens' NLL and top-1 accuracy by their false matches
  of the last k = 1, 2, 3 tokens between source and query (earlier places ending in the same k tokens: what an
  induction head matching k tokens must rank below the source), overall and per copy distance, and with
  ``--free-distances`` (e) one copy at each given distance with the text between free of the copied symbols vs
  random: a reach limited by look-alikes recovers in the free windows, one limited by the distance does not;
  (c)-(e) in the long phase's alphabet or each of ``--eval-alphabets`` (N distinct byte tokens,
  ``tasks.copy_alphabet_of``; JSON keys ``L`` for letters, ``L@N`` otherwise);
- per head of the previous-token heads' layer (layer 0 in the small models, layer 2 in the 16-layer testbed model;
  ``--probe-layer`` picks another), the attention on the previous token at the end of 64- and 512-token windows of
  random letters (the heads that induction builds on), and the largest content-averaged logit at distances 2..63
  and 64..511 against the one at distance 1: RoPE makes this logit a sum of cosines of the distance, fitted low only
  at the distances training showed.

Training data (``--data``): ``stage``: the copy stage's windows (``tasks.copy_windows``, ``--inner`` as
``TrainConfig.copy_inner``); ``episodes``: ``--length``-token windows with one copy episode per ``--episode-every``
tokens, its copy distance 12 + 0..``--max-gap`` (``tasks.copy_episode_windows``); ``long-phase``: what the copy
stage draws in its long phase (``train.copy_batches`` with ``copy_long_length`` = ``--length``: several lengths
run in turn, ``--batch`` windows of the longest a step, as many tokens at each; ``--gaps``, ``--mix`` and
``--long-alphabet`` as ``copy_long_gaps``, ``copy_long_mix`` and ``copy_long_alphabet``), and with
``--long-share`` < 1 the whole copy stage (64-token windows first, one optimizer, as ``run_stage``). ``--alphabet``
N: the short windows' text in N printable characters (``copy_alphabet``; the long ones too unless
``--long-alphabet``). ``--init`` continues a saved model (the short windows' stage).

    python -m benchmarks.copy_position --data stage --length 64 --steps 1500          # the copy stage, 2 layers
    python -m benchmarks.copy_position --layers 4 --init copy2000.pt --data long-phase --length 256,512,1024,2048 \
        --batch 1 --steps 200 --every 50 --eval-lengths 64,512,2048 --windows 8   # long phase as a length curriculum
    python -m benchmarks.copy_position --eval-only copy2000.pt --layers 4       # a saved model (its own shape)

On a GPU, the retrieval preset's whole copy stage with its own model (bf16 autocast as run_stage), ~3 minutes: 1125
steps of 256 64-token windows, then 375 long-phase steps as a curriculum of ~94 steps at each of 256, 1024, 4096
and 16384 tokens with log-uniform copy distances (16384 tokens a step), evaluated at the end of each length; and
the same stage with the preset's one jump to 16384 (H200 run 49 made that jump from a saved model with a fresh
optimizer: the copying was gone at every length within 125 steps):

    python -m benchmarks.copy_position --testbed-shape --device cuda --data long-phase --long-share 0.25 \
        --length 256,1024,4096,16384 --gaps log --batch 1 --steps 1500 --eval-steps 1125,1219,1313,1407 \
        --eval-lengths 64,1024,4096,16384 --results copy_position_curriculum
    python -m benchmarks.copy_position --testbed-shape --device cuda --data long-phase --long-share 0.25 \
        --length 16384 --batch 1 --steps 1500 --eval-steps 1125,1250,1375 \
        --eval-lengths 64,1024,4096,16384 --results copy_position_one_jump
H200 run 56 ran that curriculum: the copying moved to any position (64-token copies at 16K: 0.70) but never to
any distance ((a) at chance at every length and stage). On the CPU (benchmarks/results/copy16_cpu.log) a copier
as sharp as the testbed's after its 64-token stage (attention logits ~3.5x the 4-layer CPU model's) collapses at a
4x first jump (64 -> 256) and extends in 2x steps. The testbed's copy stage with 2x steps from 128 to 4096 (900
steps of 64-token windows, then 100 steps at each length, 16384 tokens a step; ~3.3 minutes):

    python -m benchmarks.copy_position --testbed-shape --device cuda --data long-phase --long-share 0.4 \
        --length 128,256,512,1024,2048,4096 --gaps log --batch 4 --steps 1500 \
        --eval-steps 900,1000,1100,1200,1300,1400 --eval-lengths 64,256,1024,4096 --eval-distances 1024,4096 \
        --results copy_position_2x
H200 runs 60 and 61 ran it (61 with 327 steps a length): the copying reached ~32-64 and ~128-256 tokens back. Whether
that reach ends at earlier look-alikes of the copied tokens' context (a head matching one previous token meets one
about every 26 letters) or at the distance itself, (d) and (e) on the same recipe tell (~3.5 minutes; CPU evidence
in benchmarks/results/copy_reach_cpu.log):

    python -m benchmarks.copy_position --testbed-shape --device cuda --data long-phase --long-share 0.4 \
        --length 128,256,512,1024,2048,4096 --gaps log --batch 4 --steps 1500 --eval-steps 1200 \
        --eval-lengths 64,1024,4096 --eval-distances 1024,4096 --windows 32 --competitors \
        --free-distances 32,128,512,2048 --results copy_reach_2x
The same with one distractor per copy in the long windows (``--distract 1``: a near-copy before each copy sharing
its 2-token runs, each followed by a wrong token; CPU: a little further reach, benchmarks/results/
copy_distract_cpu.log) and (c)/(d) also in windows with distractors (``--eval-distract 1``), ~4 minutes:

    python -m benchmarks.copy_position --testbed-shape --device cuda --data long-phase --long-share 0.4 \
        --length 128,256,512,1024,2048,4096 --gaps log --batch 4 --steps 1500 --distract 1 --eval-steps 1200 \
        --eval-lengths 64,1024,4096 --eval-distances 1024,4096 --windows 32 --competitors --eval-distract 1 \
        --free-distances 32,128,512,2048 --results copy_reach_2x_distract

The (e) windows of the H200 copy_reach_2x run put ~4090 keys before every query whatever D is, yet D32 copies and
D512 does not: the logit falls with the distance, which only RoPE makes it do (benchmarks/results/copy_theta_cpu.log).
Three 8-layer arms of the testbed's width at once on one GPU (~4-5 minutes): the recipe, the same with RoPE base 1e6,
and a 4-layer copier (900 steps of 64-token windows) grown to 8 layers (--grow) before the long phase:

    C="python -m benchmarks.copy_position --testbed-shape --device cuda --windows 16 --eval-lengths 64,1024,4096 \
        --eval-distances 4096 --free-distances 32,128,512,2048"
    L="--data long-phase --gaps log --batch 4 --length 128,256,512,1024,2048,4096"
    $C $L --layers 8 --long-share 0.4 --steps 1500 --eval-steps 1200 --results copy_theta_8L_1e4 &
    $C $L --layers 8 --rope-theta 1e6 --long-share 0.4 --steps 1500 --eval-steps 1200 --results copy_theta_8L_1e6 &
    ($C --layers 4 --data stage --length 64 --batch 256 --steps 900 --every 900 --eval-lengths 64 --save /tmp/g4.pt;
     $C $L --layers 8 --init /tmp/g4.pt --grow --steps 600 --eval-steps 300 --results copy_grow_8L) &
    wait
"""
from __future__ import annotations

import argparse
import bisect
import dataclasses
import json
import math
import os
import random
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import run_metadata, table, write_results  # noqa: E402
from indexcache.checkpoint import build_empty  # noqa: E402
from indexcache.model.indexer import causal_mask  # noqa: E402
from indexcache.tools.corpus import ByteTokenizer  # noqa: E402
from indexcache.tools.probe import copied_nll as probe_copied_nll  # noqa: E402
from indexcache.tools.tasks import (COPY_ALPHABET, COPY_GAPS, COPY_SEGMENT, copy_alphabet_of,  # noqa: E402
                                    copy_distractor_spans, copy_episode_windows, copy_window_spans, copy_windows)
from indexcache.tools.train import PRESETS, _lr_at, copy_batches  # noqa: E402
from indexcache.tools.trainfwd import attention_qkv, dense_logits, forward_train  # noqa: E402

LETTERS = torch.tensor(list(COPY_ALPHABET))


def build(args, topk: int):
    base = PRESETS["retrieval"]
    w = args.width
    theta = base.rope_theta if args.rope_theta is None else args.rope_theta
    if args.testbed_shape:  # the retrieval preset's own model (16 layers; width 128 since run 70, 256 in runs 49-68;
        #                     --layers/--rope may change)
        tc = dataclasses.replace(base, topk=topk, layers=args.layers or base.layers, rope=args.rope or base.rope,
                                 rope_theta=theta)
    else:
        rope = args.rope or 16
        tc = dataclasses.replace(base, layers=args.layers or 2, hidden=w, heads=args.heads, q_lora=min(w, 128),
                                 kv_lora=min(w, 128), nope=args.nope, rope=rope, v=32, mlp=3 * w,
                                 index_heads=2, index_dim=max(32, rope), topk=topk, rope_theta=theta,
                                 init_std=base.init_std if args.init_std is None else args.init_std)
    return tc, build_empty(tc.model_config(), args.device, torch.float32)


def load_init(model, path: str, args) -> None:
    """Load a saved state dict into ``model``; ``args.grow``: it may hold only the first layers (the rest stay
    freshly initialised with their attention and MLP outputs at zero, so the model computes what the saved one
    did); ``args.q_scale``: every layer's query projection times that (attention logits times that: the same
    copier, sharper)."""
    sd = torch.load(path, map_location=args.device)
    own = model.state_dict()
    extra = sorted(set(sd) - set(own))
    missing = sorted(set(own) - set(sd))
    if extra or (missing and not args.grow):
        raise ValueError(f"{path} does not fit this model: unexpected {extra[:3]}, missing {missing[:3]} "
                         f"(--grow loads a shallower model's layers)")
    model.load_state_dict(sd, strict=False)
    loaded = {int(k.split(".")[1]) for k in sd if k.startswith("layers.")}
    with torch.no_grad():
        for i, layer in enumerate(model.layers):
            if i not in loaded:
                layer.self_attn.o_proj.weight.zero_()
                layer.mlp.down_proj.weight.zero_()
            layer.self_attn.q_b_proj.weight.mul_(args.q_scale)


def _autocast(model):
    """bf16 autocast on a GPU, as run_stage trains."""
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=next(model.parameters()).is_cuda)


def copied_nll(model, rows, cue: int = 4, chunk: int = 4) -> float:
    """Mean NLL of the copied letters after a ``cue``, dense attention (probe.copied_nll), ``chunk`` rows at a time;
    ``rows``: [(window, (source, destination, length))], one copy each."""
    return probe_copied_nll(model, [(w, [span]) for w, span in rows], cue=cue, batch=chunk)


def _bin(n: int) -> int:
    """0, or the power of two at or below ``n`` (bins 0, 1, 2-3, 4-7, ...)."""
    return 0 if n <= 0 else 1 << (n.bit_length() - 1)


def _distance_bin(d: int) -> int:
    return 12 if d < 32 else _bin(d)


@torch.no_grad()
def episode_letters(model, length: int, windows: int, alphabet: bytes = COPY_ALPHABET, cue: int = 4,
                    deepest: int = 3, distract: int = 0, distract_match: int = 2) -> list[tuple]:
    """Every copied token past its ``cue`` in the long phase's own windows (``length`` tokens, one copy per 64,
    log-uniform copy distances, held-out seeds; the same copies in every ``alphabet``, only the text differs):
    (copy, copy distance, NLL, top-1 right, false matches of the last 1 .. ``deepest`` tokens), where the
    false matches of the last k tokens are the earlier places between the source and the query that hold the
    same k tokens as those before the predicted one (what an induction head matching k previous tokens must
    rank below the source). ``distract``: the windows hold that many near-copies of each copy before it
    (``tasks.copy_distractor_spans``), so look-alikes of the last ``distract_match`` tokens are common."""
    device = next(model.parameters()).device
    out = []
    for i in range(windows):
        win, spans, _ = copy_distractor_spans(length + 1, (1 << 42) + i, 64, length - 24, alphabet=alphabet,
                                              gaps="log", distract=distract, distract_match=distract_match)
        with _autocast(model):
            logits = dense_logits(model, win[None, :-1].to(device))[0].float()
        nll = F.cross_entropy(logits, win[1:].to(device), reduction="none").cpu().tolist()
        right = (logits.argmax(-1).cpu() == win[1:]).tolist()
        ids = win.tolist()
        ends: dict[tuple, list[int]] = {}  # the last k tokens ending at j -> the j's, increasing
        for j in range(len(ids)):
            for k in range(1, min(deepest, j + 1) + 1):
                ends.setdefault(tuple(ids[j - k + 1: j + 1]), []).append(j)
        for c, (src, dst, n) in enumerate(spans):
            d = dst - src
            for t in range(dst + cue - 1, dst + n - 1):  # the query at t predicts t + 1; its source match is t - d
                false = [bisect.bisect_left(pos, t) - bisect.bisect_right(pos, t - d)
                         for pos in (ends[tuple(ids[t - k + 1: t + 1])] for k in range(1, deepest + 1))]
                out.append(((i, c), d, nll[t], bool(right[t]), *false))
    return out


def distance_table(letters: list[tuple]) -> dict:
    """Copied letters' NLL by copy distance (``episode_letters``): {lowest distance of the bin: (NLL, copies)},
    bins 12..31, 32..63, 64..127 and on in powers of two. Unlike (a)'s one copy at ~0.4 L, this shows how far the
    copying reaches."""
    sums: dict[int, list] = {}
    for copy, d, nll, *_ in letters:
        acc = sums.setdefault(_distance_bin(d), [0.0, 0, set()])
        acc[0] += nll
        acc[1] += 1
        acc[2].add(copy)
    return {b: (total / n, len(copies)) for b, (total, n, copies) in sorted(sums.items())}


def competitor_table(letters: list[tuple]) -> dict:
    """Copied letters' NLL and top-1 accuracy by their false matches of the last k = 1, 2, 3 tokens between source
    and query (bins 0, 1, 2-3, 4-7, ...), overall and within each copy-distance bin: {k: {"all": {bin: (NLL,
    accuracy, letters)}, distance bin: {bin: ...}}}. If copying fails because a head matching k tokens meets
    earlier look-alikes, the NLL follows the matches within a distance bin; if the distance itself is the limit,
    it follows the distance at equal matches."""
    out = {}
    for k in range(len(letters[0]) - 4 if letters else 0):
        sums: dict = {}
        for _, d, nll, right, *false in letters:
            for key in ("all", _distance_bin(d)):
                acc = sums.setdefault(key, {}).setdefault(_bin(false[k]), [0.0, 0, 0])
                acc[0] += nll
                acc[1] += right
                acc[2] += 1
        out[k + 1] = {key: {b: (a[0] / a[2], a[1] / a[2], a[2]) for b, a in sorted(bins.items())}
                      for key, bins in sorted(sums.items(), key=lambda kv: (kv[0] != "all", kv[0]))}
    return out


def placed_copy_rows(length: int, distance: int, windows: int, alphabet: bytes, free: bool) -> list:
    """``length``-token windows of random ``alphabet`` text holding one ``COPY_SEGMENT``-token copy at ``distance``
    that ends 8 tokens before the window does: (ids, (src, dst, n)). ``free``: the text between the source and its
    copy avoids the segment's symbols, so no earlier look-alike of any copied token lies between them (the same
    windows otherwise)."""
    n = COPY_SEGMENT
    if not 2 * n <= distance <= length - n - 9:
        raise ValueError(f"a placed copy's distance must be in [{2 * n}, {length - n - 9}] in {length}-token windows, "
                         f"got {distance}")
    rows = []
    for i in range(windows):
        rng = random.Random(f"placed:{i}:{length}:{distance}")
        text = [ByteTokenizer.BOS] + rng.choices(alphabet, k=length - 1)
        dst = length - n - 8
        src = dst - distance
        text[dst: dst + n] = text[src: src + n]
        rest = bytes(b for b in alphabet if b not in text[src: src + n])
        if free:
            if not rest:
                raise ValueError(f"no symbol of the {len(alphabet)}-symbol alphabet is left outside the copied segment")
            text[src + n: dst] = random.Random(i).choices(rest, k=dst - src - n)
        rows.append((torch.tensor(text, dtype=torch.long), (src, dst, n)))
    return rows


def length_table(model, lengths, windows: int) -> dict:
    out = {}
    for L in lengths:
        plain = [(win, spans[0]) for win, spans in (copy_window_spans(L, (1 << 40) + i) for i in range(windows))]
        out[L] = (copied_nll(model, plain), copied_nll(model, shifted_rows(L - 64, windows)))
    return out


@torch.no_grad()
def previous_token_heads(model, length: int = 512, n: int = 4, layer: int | None = None) -> tuple[int, list[dict]]:
    """The previous-token heads' layer (``layer``, or the one whose heads put the most attention on the previous
    token over the last 64 keys) and, per head of it: attention on the previous token for queries length-16..
    length-1 of random letter windows over their last 64 keys and over all, and the content-averaged logit at
    distance 1 and the largest at distances 2..63 and 64... (The 16-layer testbed forms them in layer 2, not 0.)"""
    g = torch.Generator().manual_seed(1)
    ids = LETTERS[torch.randint(0, len(LETTERS), (n, length), generator=g)]
    ids[:, 0] = ByteTokenizer.BOS
    ids = ids.to(next(model.parameters()).device)
    pos = torch.arange(length, device=ids.device).expand(n, length)
    h = model.embed(ids)
    cos, sin = model.rope(pos, h.dtype)
    late = torch.arange(length - 16, length, device=ids.device)
    per_layer = []
    for li, lyr in enumerate(model.layers):
        q, k, v, _ = attention_qkv(lyr.self_attn, lyr.input_layernorm(h), cos, sin)
        s = torch.einsum("bhtd,bhsd->bhts", q, k) * model.config.softmax_scale
        p = s.masked_fill(~causal_mask(pos, pos)[:, None], float("-inf")).softmax(-1)
        # the same queries over a 64-token window: attention renormalised over its last 64 keys (bos excluded)
        p64 = torch.stack([s[:, :, t, t - 63: t + 1] for t in late], 2).softmax(-1)[..., -2].mean((0, 2))
        per_layer.append((float(p64.mean()), s, p, p64))
        if layer is not None and li == layer:
            break
        h = h + lyr.self_attn.o_proj(torch.einsum("bhts,bhsd->bthd", p, v).flatten(2))
        h = h + lyr.mlp(lyr.post_attention_layernorm(h))
    if layer is None:
        layer = max(range(len(per_layer)), key=lambda i: per_layer[i][0])
    _, s, p, p64 = per_layer[layer]
    out = []
    for hh in range(s.shape[1]):
        prof = {d: float(s[:, hh, torch.arange(64 + d, length, device=ids.device),
                           torch.arange(64, length - d, device=ids.device)].mean())
                for d in range(1, length - 64)}
        out.append({"prev_attn_64": float(p64[hh]),
                    "prev_attn_full": float(p[:, hh, late, late - 1].mean()),
                    "logit_d1": prof[1], "max_logit_d2_63": max(prof[d] for d in range(2, 64)),
                    "max_logit_d64_up": max(prof[d] for d in range(64, length - 64))})
    return layer, out


def shifted_rows(shift: int, windows: int) -> list:
    """64-token copy windows with ``shift`` random letters inserted after <bos>: (ids, (src, dst, n))."""
    rows = []
    for i in range(windows):
        win, [(src, dst, n)] = copy_window_spans(64, (1 << 41) + i)
        pad = torch.tensor(random.Random(i).choices(COPY_ALPHABET, k=shift), dtype=torch.long)
        rows.append((torch.cat([win[:1], pad, win[1:]]), (src + shift, dst + shift, n)))
    return rows


def _dense_attention(model, rows):
    """Per layer (a generator), the dense causal attention probabilities [B, heads, T, T] of the copy windows
    ``rows`` (``shifted_rows``), running the layers on the way."""
    ids = torch.stack([r for r, _ in rows]).to(next(model.parameters()).device)
    B, T = ids.shape
    pos = torch.arange(T, device=ids.device).expand(B, T)
    h = model.embed(ids)
    cos, sin = model.rope(pos, h.dtype)
    for layer in model.layers:
        q, k, v, _ = attention_qkv(layer.self_attn, layer.input_layernorm(h), cos, sin)
        p = (torch.einsum("bhtd,bhsd->bhts", q, k) * model.config.softmax_scale) \
            .masked_fill(~causal_mask(pos, pos)[:, None], float("-inf")).softmax(-1)
        yield p
        h = h + layer.self_attn.o_proj(torch.einsum("bhts,bhsd->bthd", p, v).flatten(2))
        h = h + layer.mlp(layer.post_attention_layernorm(h))


def _mean_over_copied(p, rows, cue: int, columns) -> torch.Tensor:
    """[heads, len(columns(src, dst, t))]: the mean attention of the copied letters' queries t (dst+cue-1 ..
    dst+n-2) on the key columns ``columns`` gives for each."""
    sums, count = 0, 0
    for b, (_, (src, dst, n)) in enumerate(rows):
        t = torch.arange(dst + cue - 1, dst + n - 1, device=p.device)
        sums = sums + torch.stack([p[b, :, t, c].sum(-1) for c in columns(src, dst, t)], -1).cpu()
        count += len(t)
    return sums / count


@torch.no_grad()
def head_roles(model, shift: int, windows: int, cue: int = 4) -> list[list[tuple]]:
    """Per layer and head, the mean attention of the copied letters' queries (t = dst+cue-1 .. dst+n-2, each
    predicting t+1) on <bos>, on the previous token, and on the induction source (the letter after the earlier
    occurrence of t: src + t - dst + 1), in shifted 64-token windows (dense attention)."""
    rows = shifted_rows(shift, windows)
    cols = lambda src, dst, t: (t * 0, t - 1, src + t - dst + 1)  # noqa: E731
    return [[tuple(round(float(x), 2) for x in r) for r in _mean_over_copied(p, rows, cue, cols)]
            for p in _dense_attention(model, rows)]


@torch.no_grad()
def source_offsets(model, shift: int, windows: int, cue: int = 4, offsets=(-1, 0, 1, 2, 3)) -> list[list[float]]:
    """Per layer, the largest mean attention of one head of the copied letters' queries on the induction source
    moved by each of ``offsets`` (0: the letter to predict; 1: the one after it, where a copier matching the last
    tokens through a chain of previous-token heads may read the letter from that key's own history), shifted
    64-token windows, dense attention. A copier with no head on offset 0 (head_roles) shows here where it reads."""
    rows = shifted_rows(shift, windows)
    cols = lambda src, dst, t: [src + t - dst + 1 + o for o in offsets]  # noqa: E731
    return [[round(float(x), 2) for x in _mean_over_copied(p, rows, cue, cols).max(0).values]
            for p in _dense_attention(model, rows)]


@torch.no_grad()
def bos_moved(model, shift: int, windows: int, cue: int = 4) -> float:
    """Copied NLL of the shifted windows with <bos> given position ``shift`` (the inserted letters 0..shift-1):
    <bos> sits at its unshifted distance from the copy, only the inserted letters are new."""
    rows = shifted_rows(shift, windows)
    ids = torch.stack([r for r, _ in rows]).to(next(model.parameters()).device)
    T = ids.shape[1] - 1
    pos = torch.arange(T, device=ids.device)
    pos[0] = shift
    pos[1:shift + 1] = torch.arange(shift, device=ids.device)
    logits = model(ids[:, :-1], positions=pos.expand(len(rows), T)).logits.float()
    nll = F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
    return float(torch.cat([nll[i, dst + cue - 1: dst + n - 1] for i, (_, (_, dst, n)) in enumerate(rows)]).mean())


def analyse(model, args) -> dict:
    """Head roles at shifts 0/32/192 and the <bos>-moved NLL (the eval-only diagnosis)."""
    out = {"roles": {}, "bos_moved": {}}
    for shift in (0, 32, 64, 192):
        roles = head_roles(model, shift, args.windows)
        out["roles"][shift] = roles
        print(f"shift {shift}: attention of copied-letter queries on <bos> / previous token / induction source")
        for i, layer in enumerate(roles):
            print(f"  layer {i}: " + "  ".join(f"h{j} {a:.2f}/{b:.2f}/{c:.2f}" for j, (a, b, c) in enumerate(layer)))
    out["source_offsets"] = {}
    for shift in (0, 192):
        out["source_offsets"][shift] = source_offsets(model, shift, args.windows)
        print(f"shift {shift}: per layer, one head's largest attention of copied-letter queries on the induction "
              f"source moved by -1/0/+1/+2/+3: " + "  ".join(f"L{i} " + "/".join(f"{a:.2f}" for a in r)
                                                           for i, r in enumerate(out["source_offsets"][shift])))
    for shift in (32, 64, 192):
        out["bos_moved"][shift] = bos_moved(model, shift, args.windows)
        print(f"shift {shift}: copied NLL with <bos> at its unshifted distance {out['bos_moved'][shift]:.3f}")
    return out


def _cells(bins: dict) -> str:
    return "  ".join(f"{b} {nll:.2f}/{acc:.2f} ({n})" for b, (nll, acc, n) in bins.items())


def evaluate(model, args, label: str) -> dict:
    model.eval()
    table = length_table(model, args.eval_lengths, args.windows)
    layer, heads = previous_token_heads(model, layer=args.probe_layer)
    cells = "  ".join(f"L{L} {a:.2f}/{b:.2f}" for L, (a, b) in table.items())
    print(f"{label}: copied NLL (a) copy window / (b) 64-window shifted: {cells}", flush=True)
    dist, rivals = {}, {}
    for L, size, nd in [(L, size, nd) for L in args.eval_distances for size in eval_alphabets(args)
                        for nd in sorted({0, args.eval_distract})]:
        # letters: the keys of old results; +dN: windows with N distractors per copy
        key = (str(L) if size == len(COPY_ALPHABET) else f"{L}@{size}") + (f"+d{nd}" if nd else "")
        letters = episode_letters(model, L, max(1, args.windows // 4), copy_alphabet_of(size),
                                  distract=nd, distract_match=args.distract_match)
        dist[key] = distance_table(letters)
        what = "" if size == len(COPY_ALPHABET) else f", {size} symbols (chance {math.log(size):.2f})"
        what += f", {nd} distractors per copy sharing {args.distract_match}-token runs" if nd else ""
        print(f"  (c) L{L} long-phase windows{what}, copied NLL by copy distance: "
              + "  ".join(f"{b}+ {v:.2f}" for b, (v, _) in dist[key].items()), flush=True)
        if not args.competitors:
            continue
        rivals[key] = competitor_table(letters)
        print(f"  (d) L{L}{'+d' + str(nd) if nd else ''}, {size} symbols: copied NLL/top-1 accuracy (tokens) by "
              f"false matches of the last k tokens between source and query (0, 1, 2-3, 4-7, ...), all and per copy "
              f"distance:", flush=True)
        for k, rows in rivals[key].items():
            for where, bins in rows.items():
                print(f"      k={k} {where if where == 'all' else f'd {where}+'}: {_cells(bins)}", flush=True)
    free = {}
    for L in args.eval_distances if args.free_distances else ():
        for size in eval_alphabets(args):
            key = str(L) if size == len(COPY_ALPHABET) else f"{L}@{size}"
            free[key] = {D: tuple(copied_nll(model, placed_copy_rows(L, D, args.windows, copy_alphabet_of(size), f))
                                  for f in (True, False)) for D in args.free_distances if D <= L - COPY_SEGMENT - 9}
            print(f"  (e) L{L}, {size} symbols: copied NLL of one copy at distance D, 8 tokens before the end, with "
                  f"no look-alike of the copied tokens between / random text between: "
                  + "  ".join(f"D{D} {a:.2f}/{b:.2f}" for D, (a, b) in free[key].items()), flush=True)
    for i, hd in enumerate(heads):
        print(f"  L{layer} h{i}: prev-token attention {hd['prev_attn_64']:.2f} over 64 keys -> "
              f"{hd['prev_attn_full']:.2f} over 512; logit d=1 {hd['logit_d1']:.1f}, max d in 2..63 "
              f"{hd['max_logit_d2_63']:.1f}, max d >= 64 {hd['max_logit_d64_up']:.1f}", flush=True)
    res = {"label": label, "table": {str(k): v for k, v in table.items()}, "prev_layer": layer, "heads": heads,
           "by_distance": {key: {str(b): v for b, v in bins.items()} for key, bins in dist.items()}}
    if free:
        res["placed_copy_free_vs_random"] = {key: {str(D): v for D, v in t.items()} for key, t in free.items()}
    if args.competitors:
        res["by_false_matches"] = {key: {str(k): {str(w): {str(b): v for b, v in bins.items()}
                                                  for w, bins in rows.items()} for k, rows in t.items()}
                                   for key, t in rivals.items()}
    return res


def eval_alphabets(args) -> list[int]:
    """The alphabet sizes of the (c)/(d) windows: --eval-alphabets, or the long phase's own."""
    return args.eval_alphabets or [args.long_alphabet or args.alphabet or len(COPY_ALPHABET)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=None, help="default 2 (--testbed-shape: the preset's 16)")
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--nope", type=int, default=32)
    ap.add_argument("--rope", type=int, default=None, help="rope dims per head (qk_rope_head_dim; default 16, "
                    "--testbed-shape: the preset's)")
    ap.add_argument("--rope-theta", type=float, default=None, help="RoPE base (default: the preset's rope_theta)")
    ap.add_argument("--init-std", type=float, default=None, help="default: the retrieval preset's")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--length", type=lambda s: [int(x) for x in s.split(",")], default=[64],
                    help="training window length; long-phase: increasing lengths run in turn (curriculum), the "
                         "steps split evenly, --batch windows of the longest a step, as many tokens at each")
    ap.add_argument("--gaps", choices=COPY_GAPS, default="uniform",
                    help="long-phase copy distances (TrainConfig.copy_long_gaps)")
    ap.add_argument("--mix", type=float, default=0.0,
                    help="long-phase share of each step's tokens in 64-token copy windows (TrainConfig.copy_long_mix)")
    ap.add_argument("--data", choices=("stage", "episodes", "long-phase"), default="stage")
    ap.add_argument("--inner", type=int, default=None, help="stage data: the copy in a random sub-window")
    ap.add_argument("--episode-every", type=int, default=64)
    ap.add_argument("--max-gap", type=int, default=40)
    ap.add_argument("--init", default=None, help="start from this saved state dict instead of random weights")
    ap.add_argument("--every", type=int, default=500, help="evaluate every this many steps")
    ap.add_argument("--eval-steps", type=lambda s: [int(x) for x in s.split(",")], default=None,
                    help="evaluate after these steps instead (and after the last)")
    ap.add_argument("--long-share", type=float, default=1.0,
                    help="long-phase: the share of the steps on long windows, after 64-token copy windows (the "
                         "whole copy stage as run_stage trains it, one optimizer: TrainConfig.copy_long_share)")
    ap.add_argument("--eval-lengths", type=lambda s: [int(x) for x in s.split(",")], default=[64, 128, 256, 512])
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--eval-distances", type=lambda s: [int(x) for x in s.split(",")], default=[],
                    help="also the copied NLL by copy distance in long-phase windows of these lengths ((c))")
    ap.add_argument("--alphabet", type=int, default=None,
                    help="the short (stage) windows' text: this many distinct printable characters, at most 95 "
                         "(TrainConfig.copy_alphabet = tasks.copy_alphabet_of(N); default: the 26 letters)")
    ap.add_argument("--long-alphabet", type=int, default=None,
                    help="long-phase windows' text: this many distinct byte tokens (TrainConfig.copy_long_alphabet, "
                         "tasks.copy_alphabet_of; default: the 26 letters)")
    ap.add_argument("--distract", type=int, default=0,
                    help="long-phase: near-copies of each copy before it, sharing its runs of --distract-match "
                         "tokens, each followed by a wrong one (TrainConfig.copy_long_distract)")
    ap.add_argument("--distract-match", type=int, default=2,
                    help="tokens a distractor shares before each wrong token (TrainConfig.copy_long_distract_match)")
    ap.add_argument("--eval-distract", type=int, default=0,
                    help="(c)/(d) also in windows with this many distractors per copy (key suffix +dN)")
    ap.add_argument("--eval-alphabets", type=lambda s: [int(x) for x in s.split(",")], default=None,
                    help="alphabet sizes of the (c)/(d) windows (default: the long phase's; 26: letters)")
    ap.add_argument("--competitors", action="store_true",
                    help="(d): copied NLL in the --eval-distances windows by the false matches of the last 1/2/3 "
                         "tokens between source and query, overall and per copy distance")
    ap.add_argument("--free-distances", type=lambda s: [int(x) for x in s.split(",")], default=[],
                    help="(e): in windows of each --eval-distances length, one copy at each of these distances with "
                         "the text between free of the copied symbols vs random (no false match vs many)")
    ap.add_argument("--probe-layer", type=int, default=None,
                    help="layer of the previous-token heads to profile (default: the one attending most to it)")
    ap.add_argument("--eval-only", default=None, help="evaluate this saved state dict, no training")
    ap.add_argument("--save", default=None, help="save the state dict here (and the optimizer's as SAVE.opt)")
    ap.add_argument("--grow", action="store_true",
                    help="--init/--eval-only may hold fewer layers: they become the first layers, the others start "
                         "with zero attention and MLP outputs (the same function, more layers to train)")
    ap.add_argument("--q-scale", type=float, default=1.0,
                    help="multiply the loaded model's query projections (attention logits) by this: a sharper copier")
    ap.add_argument("--init-opt", default=None, help="continue this saved optimizer state (SAVE.opt) with --init")
    ap.add_argument("--warm", type=int, default=20, help="learning-rate warm-up steps")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--testbed-shape", action="store_true",
                    help="the retrieval preset's own model (16 layers; width 128, 256 before run 70) instead of "
                         "--layers/--width/...")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--results", default=None, help="also write the JSON as NAME.json (common.write_results: $OUT)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.data != "long-phase" and len(args.length) != 1:
        ap.error(f"--length takes several lengths only with --data long-phase, got {args.length}")
    if args.alphabet is not None and not 2 <= args.alphabet <= 95:
        ap.error(f"--alphabet takes 2..95 printable characters (TrainConfig.copy_alphabet is text), "
                 f"got {args.alphabet}")
    for size in eval_alphabets(args) + [args.long_alphabet or len(COPY_ALPHABET)]:
        try:
            copy_alphabet_of(size)
        except ValueError as e:
            ap.error(str(e))
    for name, value, lo in (("--distract", args.distract, 0), ("--eval-distract", args.eval_distract, 0),
                            ("--distract-match", args.distract_match, 1)):
        if value < lo or (name == "--distract-match" and value > COPY_SEGMENT - 2):
            ap.error(f"{name} must be >= {lo}" + (f" and <= {COPY_SEGMENT - 2}" if lo else "") + f", got {value}")
    longest = max(args.length)
    tc, model = build(args, topk=max(args.eval_lengths + [longest]))  # top-k >= every window: dense
    model.init_random(args.seed, std=tc.init_std, mlp_out_std=tc.init_mlp_out_std)  # (--grow: the new layers)
    if args.eval_only:
        load_init(model, args.eval_only, args)
        res = evaluate(model, args, f"{args.eval_only}")
        res["analysis"] = analyse(model, args)
        print(json.dumps(res))
        return 0
    if args.init:
        load_init(model, args.init, args)
    gen = torch.Generator().manual_seed(args.seed)
    short_alphabet = copy_alphabet_of(args.alphabet or len(COPY_ALPHABET))
    long_tc = dataclasses.replace(tc, copy_length=64, copy_batch=args.batch * longest // 64,
                                  copy_alphabet=short_alphabet.decode(),
                                  copy_long_length=tuple(args.length), copy_long_share=args.long_share,
                                  copy_long_gaps=args.gaps, copy_long_mix=args.mix,
                                  copy_long_alphabet=args.long_alphabet, copy_long_distract=args.distract,
                                  copy_long_distract_match=args.distract_match)
    params = [p for n, p in model.named_parameters() if ".indexer." not in n]
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.95), weight_decay=0.01)
    if args.init_opt:
        opt.load_state_dict(torch.load(args.init_opt, map_location=args.device))
    results, t0, curve = [], time.perf_counter(), []
    for step in range(args.steps):
        model.train()
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, args.steps, args.lr, warm=args.warm, decay=False)
        if args.data == "long-phase":  # what run_stage("copy") draws in its long phase (TrainConfig.copy_long_*)
            batches = copy_batches(long_tc, step, args.steps, gen)
        elif args.data == "stage":
            batches = [copy_windows(args.batch, longest + 1, gen, inner=args.inner, alphabet=short_alphabet)]
        else:
            batches = [copy_episode_windows(args.batch, longest + 1, gen, args.episode_every, args.max_gap)]
        opt.zero_grad(set_to_none=True)
        lm = 0.0
        for ids, w in zip(batches, [1.0] if len(batches) == 1 else [1 - args.mix, args.mix]):  # as run_stage
            with _autocast(model):
                part, _ = forward_train(model, ids.to(args.device), "dense")
            (w * part).backward()
            lm = lm + w * part.detach()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        curve.append(float(lm.detach()))
        if (step + 1 in args.eval_steps if args.eval_steps else (step + 1) % args.every == 0) \
                or step + 1 == args.steps:
            lm_mean = sum(curve[-50:]) / len(curve[-50:])
            results.append(evaluate(model, args, f"step {step + 1} ({time.perf_counter() - t0:.0f} s, "
                                                 f"train LM {lm_mean:.3f})"))
            if not math.isfinite(lm_mean):
                break
    results[-1]["analysis"] = analyse(model, args)
    if args.save:
        torch.save(model.state_dict(), args.save)
        torch.save(opt.state_dict(), args.save + ".opt")
    payload = {"meta": run_metadata(), "args": vars(args), "results": results}
    print(json.dumps(payload))
    if args.results:
        write_results(args.results, payload)
    print(table([{"L": L, "(a) copy window": a, "(b) shifted 64-window": b}
                 for L, (a, b) in results[-1]["table"].items()], ["L", "(a) copy window", "(b) shifted 64-window"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
