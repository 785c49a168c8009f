"""Does a from-scratch model learn to copy from context (induction), and how fast? CPU, minutes.

Sequences of random letters in which a 12-letter segment repeats at a random later offset; the score is the mean
NLL of the repeated letters after the first two (chance: ln 26 = 3.258; a model that copies goes towards 0). Trains
a DSA model (this repository's training forward, dense attention) with weights drawn N(0, --init-std), or with
``--vanilla`` a ``torch.nn.TransformerEncoder`` of the same width with learned positions (PyTorch's own
initialisation), as the yardstick. Each report line of the DSA model also gives, per layer and head, the mean
attention on the previous token and on the induction source (the token after the earlier copy of the current
one): copying needs a previous-token head below an induction head. The other options are ablations that locate
why a model does not copy; the retrieval testbed's initialisation comes from them (MLPs start at zero).

    python -m benchmarks.induction_toy --init-std 0.08 --lr 1e-3 --steps 2000 --every 500
    python -m benchmarks.induction_toy --init-std 0.08 --lr 1e-3 --mlp-out-std 0 --steps 2000 --every 500
    python -m benchmarks.induction_toy --vanilla --steps 2000 --every 500
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
from indexcache.model.indexer import causal_mask  # noqa: E402
from indexcache.tools.trainfwd import attention_qkv, forward_train, run_layer_train  # noqa: E402

LENGTH, SEGMENT = 64, 12


def batch(n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ids [n, LENGTH+1] (BOS first), the mask of scored targets (repeated letters after the first two) and each
    row's repeat distance."""
    x = torch.randint(97, 123, (n, LENGTH + 1), generator=g)
    mask = torch.zeros(n, LENGTH + 1, dtype=torch.bool)
    shift = torch.zeros(n, dtype=torch.long)
    for i in range(n):
        a = int(torch.randint(1, LENGTH // 2 - SEGMENT, (1,), generator=g))
        b = int(torch.randint(a + SEGMENT, LENGTH + 1 - SEGMENT, (1,), generator=g))
        x[i, b: b + SEGMENT] = x[i, a: a + SEGMENT]
        mask[i, b + 2: b + SEGMENT] = True
        shift[i] = b - a
    x[:, 0] = 256
    return x, mask, shift


@torch.no_grad()
def attention_report(model, ids: torch.Tensor, mask: torch.Tensor, shift: torch.Tensor) -> str:
    """Per layer and head of the DSA model: mean attention on the previous token (over all queries) and on the
    induction source (the token after the earlier copy of the current one, over the scored queries)."""
    inp = ids[:, :-1]
    B, T = inp.shape
    pos = torch.arange(T).expand(B, T)
    h = model.embed(inp)
    cos, sin = model.rope(pos, h.dtype)
    rows, cols = mask[:, 1:].nonzero(as_tuple=True)  # scored target at cols+1, predicted at query cols
    src = cols + 1 - shift[rows]
    parts = []
    for i, layer in enumerate(model.layers):
        q, k, _, _ = attention_qkv(layer.self_attn, layer.input_layernorm(h), cos, sin)
        s = torch.einsum("bhtd,bhsd->bhts", q, k) * model.config.softmax_scale
        p = torch.softmax(s.masked_fill(~causal_mask(pos, pos)[:, None], float("-inf")), -1)
        prev = p.diagonal(-1, 2, 3).mean((0, 2))
        ind = p[rows, :, cols, src].mean(0)
        parts.append(f"L{i} prev " + "/".join(f"{x:.2f}" for x in prev) + " ind " + "/".join(f"{x:.2f}" for x in ind))
        h = run_layer_train(model, i, h, cos, sin, pos, dense=True).h
    return " | ".join(parts)


class Vanilla(nn.Module):
    def __init__(self, width: int, layers: int, heads: int):
        super().__init__()
        self.embed, self.pos = nn.Embedding(260, width), nn.Embedding(LENGTH + 1, width)
        layer = nn.TransformerEncoderLayer(width, heads, 2 * width, 0.0, batch_first=True, norm_first=True)
        self.body = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(width, 260)

    def forward(self, ids):
        T = ids.shape[1]
        h = self.embed(ids) + self.pos(torch.arange(T, device=ids.device))
        return self.head(self.body(h, mask=nn.Transformer.generate_square_subsequent_mask(T), is_causal=True))


@torch.no_grad()
def torch_default_init(model: nn.Module) -> None:
    """PyTorch's own module initialisation (Linear: U(+-1/sqrt(fan_in)), Embedding: N(0, 1), norms: 1)."""
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Embedding, nn.LayerNorm)):
            m.reset_parameters()
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.fill_(1.0)


class Zero(nn.Module):
    def forward(self, x):
        return torch.zeros_like(x)


def ablate(model: nn.Module, what: str) -> None:
    """Toy-only swaps of DSA model parts: 'lora-norms' (q_a/kv_a RMSNorms -> identity), 'mlp' (MLPs -> zero)."""
    for layer in model.layers:
        if what == "lora-norms":
            layer.self_attn.q_a_layernorm = layer.self_attn.kv_a_layernorm = nn.Identity()
        elif what == "mlp":
            layer.mlp = Zero()
        else:
            raise ValueError(f"unknown ablation {what!r}")


def add_learned_positions(model: nn.Module, std: float) -> None:
    """Toy-only extra positional signal: a learned absolute position table added to the token embedding."""
    model.toy_pos = nn.Parameter(torch.randn(LENGTH + 1, model.config.hidden_size) * std)
    model.embed_tokens.register_forward_hook(lambda mod, inp, out: out + model.toy_pos[: out.shape[-2]])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--init-std", type=float, default=0.02)
    ap.add_argument("--mlp-out-std", type=float, default=None,
                    help="DSA model: std of the MLP output projections (default: --init-std; 0: MLPs start at zero)")
    ap.add_argument("--init", choices=("normal", "torch"), default="normal",
                    help="DSA model: N(0, --init-std) for every matrix, or PyTorch's default module init")
    ap.add_argument("--embed-common", type=float, default=0.0, metavar="STD",
                    help="DSA model: add one shared vector drawn N(0, STD) to every token embedding")
    ap.add_argument("--abs-pos", type=float, default=None, metavar="STD",
                    help="DSA model: add a learned absolute position table drawn N(0, STD)")
    ap.add_argument("--ablate", action="append", default=[], choices=("lora-norms", "mlp"))
    ap.add_argument("--std-for", action="append", default=[], metavar="SUBSTRING=STD",
                    help="DSA model: redraw the weights whose name contains SUBSTRING from N(0, STD)")
    ap.add_argument("--vanilla", action="store_true")
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=2)
    ap.add_argument("--rope", type=int, default=16, help="rotary dimensions per query/key head (DSA model)")
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--every", type=int, default=250)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.vanilla:
        model = Vanilla(args.width, args.layers, args.heads)
        loss_fn = lambda ids: F.cross_entropy(model(ids[:, :-1]).transpose(1, 2), ids[:, 1:])  # noqa: E731
        logits_fn = lambda ids: model(ids)  # noqa: E731
    else:
        w = args.width
        tc = TrainConfig(layers=args.layers, hidden=w, heads=args.heads, q_lora=min(w, 128), kv_lora=min(w, 128),
                         nope=16, rope=args.rope, v=32, mlp=2 * w,
                         index_heads=2, index_dim=max(16, args.rope), topk=LENGTH + 1,
                         context=LENGTH)
        model = build_empty(tc.model_config(), "cpu", torch.float32).init_random(0, std=args.init_std, mlp_out_std=args.mlp_out_std)
        if args.init == "torch":
            torch_default_init(model)
        for what in args.ablate:
            ablate(model, what)
        for spec in args.std_for:
            key, std = spec.split("=")
            hits = [p for n, p in model.named_parameters() if key in n]
            if not hits:
                raise ValueError(f"--std-for {spec!r}: no parameter name contains {key!r}")
            with torch.no_grad():
                for p in hits:
                    p.normal_(0.0, float(std))
        if args.embed_common:
            with torch.no_grad():
                model.embed_tokens.weight += torch.randn(w) * args.embed_common
        if args.abs_pos is not None:
            add_learned_positions(model, args.abs_pos)
        loss_fn = lambda ids: forward_train(model, ids, "dense")[0]  # noqa: E731
        logits_fn = lambda ids: model(ids).logits  # noqa: E731
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.01)
    g, (ev, ev_mask, ev_shift) = torch.Generator().manual_seed(0), batch(64, torch.Generator().manual_seed(1))
    name = " ".join(["vanilla" if args.vanilla else "dsa"] + list(sys.argv[1:] if argv is None else argv))
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
            report = "" if args.vanilla else "  " + attention_report(model, ev, ev_mask, ev_shift)
            print(f"{name}: step {step} copy NLL {curve[-1]['copy_nll']:.3f} (chance {math.log(26):.3f}) "
                  f"{time.perf_counter() - t0:.0f} s{report}", flush=True)
    print(json.dumps({"model": name, "lr": args.lr, "steps": args.steps, "curve": curve}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
