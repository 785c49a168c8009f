"""Does a copy-stage model copy outside its training windows? On a checkpoint saved by ``benchmarks.copy_warmup
--copy-checkpoint F`` (its default model shape), the copied letters' NLL (after a 4-byte cue) on

  (a) copy windows like the training ones, of length L (the copy distance grows with L), and
  (b) 64-token training windows with L - 64 random letters inserted after <bos> (the same copy distance, more
      tokens before it and a farther <bos>),

with dense attention: the copy stage trains no indexer, so the model's own top-k would be a random selection.

    python -m benchmarks.copy_length_eval --checkpoint runs/copy2000.pt      # CPU, a few seconds
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import random
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from indexcache.checkpoint import build_empty  # noqa: E402
from indexcache.tools.probe import copied_nll as probe_copied_nll  # noqa: E402
from indexcache.tools.tasks import COPY_ALPHABET, copy_window_spans  # noqa: E402
from indexcache.tools.train import PRESETS  # noqa: E402


def copied_nll(model, rows, cue: int = 4) -> float:
    """Mean NLL of the copied letters after a ``cue`` (probe.copied_nll, all rows in one forward);
    ``rows``: [(window, (source, destination, length))], one copy each."""
    return probe_copied_nll(model, [(w, [span]) for w, span in rows], cue=cue, batch=len(rows))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--lengths", default="64,96,128,256")
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    args = ap.parse_args(argv)
    if not os.path.exists(args.checkpoint):
        print(f"error: no checkpoint at {args.checkpoint!r} (make one with benchmarks.copy_warmup --copy-checkpoint)",
              file=sys.stderr)
        return 2
    base, w = PRESETS["retrieval"], args.width
    tc = dataclasses.replace(base, layers=args.layers, hidden=w, heads=args.heads, q_lora=min(w, 128),
                             kv_lora=min(w, 128), nope=32, v=32, mlp=3 * w, index_heads=2, index_dim=32, topk=64)
    model = build_empty(tc.model_config(), "cpu", torch.float32).eval()
    model.load_state_dict(torch.load(args.checkpoint))
    print(f"copied letters' NLL, nats (chance ln 26 = 3.26); {args.windows} windows per cell")
    for L in (int(x) for x in args.lengths.split(",")):
        plain = [(win, spans[0]) for win, spans in (copy_window_spans(L, (1 << 40) + i) for i in range(args.windows))]
        shifted = []
        for i in range(args.windows):
            win, [(src, dst, n)] = copy_window_spans(64, (1 << 41) + i)
            pad = torch.tensor(random.Random(i).choices(COPY_ALPHABET, k=L - 64), dtype=torch.long)
            shifted.append((torch.cat([win[:1], pad, win[1:]]), (src + L - 64, dst + L - 64, n)))
        print(f"L {L:4d}: (a) training-like window {copied_nll(model, plain):.3f}   (b) 64-token window shifted "
              f"right by {L - 64:3d}: {copied_nll(model, shifted):.3f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
