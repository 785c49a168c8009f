"""Does a from-scratch model learn to copy from context (induction), and how fast? CPU, minutes.

Sequences of random letters in which a 12-letter segment repeats at a random later offset; the score is the mean
NLL of the repeated letters after the first two (chance: ln 26 = 3.258; a model that copies goes towards 0). Trains
a 2-layer DSA model (this repository's training forward, dense attention) with weights drawn N(0, --init-std), or
with ``--vanilla`` a 2-layer ``torch.nn.TransformerEncoder`` of the same width with learned positions (PyTorch's
own initialisation), as the yardstick. The retrieval testbed's ``init_std`` comes from this comparison.

    python -m benchmarks.induction_toy --init-std 0.02 --steps 1500
    python -m benchmarks.induction_toy --init-std 0.08 --steps 1500
    python -m benchmarks.induction_toy --vanilla --steps 1500
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from indexcache.checkpoint import build_empty  # noqa: E402
from indexcache.tools.train import TrainConfig  # noqa: E402
from indexcache.tools.trainfwd import forward_train  # noqa: E402

LENGTH, SEGMENT, WIDTH = 64, 12, 64


def batch(n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """ids [n, LENGTH+1] (BOS first) and the mask of scored targets (repeated letters after the first two)."""
    x = torch.randint(97, 123, (n, LENGTH + 1), generator=g)
    mask = torch.zeros(n, LENGTH + 1, dtype=torch.bool)
    for i in range(n):
        a = int(torch.randint(1, LENGTH // 2 - SEGMENT, (1,), generator=g))
        b = int(torch.randint(a + SEGMENT, LENGTH + 1 - SEGMENT, (1,), generator=g))
        x[i, b: b + SEGMENT] = x[i, a: a + SEGMENT]
        mask[i, b + 2: b + SEGMENT] = True
    x[:, 0] = 256
    return x, mask


class Vanilla(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed, self.pos = nn.Embedding(260, WIDTH), nn.Embedding(LENGTH + 1, WIDTH)
        layer = nn.TransformerEncoderLayer(WIDTH, 2, 2 * WIDTH, 0.0, batch_first=True, norm_first=True)
        self.body, self.head = nn.TransformerEncoder(layer, 2), nn.Linear(WIDTH, 260)

    def forward(self, ids):
        T = ids.shape[1]
        h = self.embed(ids) + self.pos(torch.arange(T, device=ids.device))
        return self.head(self.body(h, mask=nn.Transformer.generate_square_subsequent_mask(T), is_causal=True))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--init-std", type=float, default=0.02)
    ap.add_argument("--vanilla", action="store_true")
    ap.add_argument("--rope", type=int, default=16, help="rotary dimensions per query/key head (DSA model)")
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--every", type=int, default=250)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    if args.vanilla:
        model = Vanilla()
        loss_fn = lambda ids: F.cross_entropy(model(ids[:, :-1]).transpose(1, 2), ids[:, 1:])  # noqa: E731
        logits_fn = lambda ids: model(ids)  # noqa: E731
    else:
        tc = TrainConfig(layers=2, hidden=WIDTH, heads=2, q_lora=WIDTH, kv_lora=WIDTH, nope=16, rope=args.rope, v=32,
                         mlp=2 * WIDTH, index_heads=2, index_dim=max(16, args.rope), topk=LENGTH + 1,
                         context=LENGTH)
        model = build_empty(tc.model_config(), "cpu", torch.float32).init_random(0, std=args.init_std)
        loss_fn = lambda ids: forward_train(model, ids, "dense")[0]  # noqa: E731
        logits_fn = lambda ids: model(ids).logits  # noqa: E731
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95))
    g, (ev, ev_mask) = torch.Generator().manual_seed(0), batch(64, torch.Generator().manual_seed(1))
    name = "vanilla" if args.vanilla else f"dsa init_std {args.init_std} rope {args.rope}"
    curve, t0 = [], time.perf_counter()
    for step in range(args.steps):
        for group in opt.param_groups:
            group["lr"] = args.lr * min(1.0, (step + 1) / 50)
        loss = loss_fn(batch(32, g)[0])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % args.every == 0 or step == args.steps - 1:
            with torch.no_grad():
                nll = F.cross_entropy(logits_fn(ev[:, :-1]).transpose(1, 2), ev[:, 1:], reduction="none")
            curve.append({"step": step, "copy_nll": float(nll[ev_mask[:, 1:]].mean())})
            print(f"{name}: step {step} copy NLL {curve[-1]['copy_nll']:.3f} (chance {math.log(26):.3f}) "
                  f"{time.perf_counter() - t0:.0f} s", flush=True)
    print(json.dumps({"model": name, "lr": args.lr, "steps": args.steps, "curve": curve}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
