"""Does the copy warm-up stage teach a from-scratch model of the testbed's architecture to copy, and does the copying
survive the dense stage on the normal training mix? CPU, minutes.

A scaled-down retrieval preset (its initialisation, learning rates and training mix; ``--layers``/``--width``/
``--heads`` set the size) trains ``--copy-steps`` steps of the copy stage (tools/train.py ``run_stage("copy")``:
pure copy windows, tasks.copy_windows), then ``--dense-steps`` steps of the dense stage on stdlib code mixed with
packed retrieval-task windows. The copy probe (tools/probe.py: a 32-char hex string written twice into 1K tokens
of held-out code; ln 16 = 2.77 nats is a model that only knows the string is hex) is measured every ``--every``
steps of each stage and at its end, with the NLL of the copied bytes (after their first 4) of held-out copy
windows. ``--copy-steps 0`` is the same dense training without the warm-up.

    python -m benchmarks.copy_warmup --copy-steps 400 --dense-steps 150
    python -m benchmarks.copy_warmup --copy-steps 0 --dense-steps 150
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from indexcache.checkpoint import build_empty  # noqa: E402
from indexcache.tools.corpus import load_corpus  # noqa: E402
from indexcache.tools.probe import copy_probe  # noqa: E402
from indexcache.tools.tasks import copy_window_spans  # noqa: E402
from indexcache.tools.train import PRESETS, run_stage  # noqa: E402
from indexcache.tools.trainfwd import dense_logits  # noqa: E402


@torch.no_grad()
def copy_window_nll(model, length: int, n: int = 8, cue: int = 4) -> float:
    """Mean NLL (nats) of the copied bytes after the first ``cue`` of each copy, on ``n`` held-out copy windows
    (seeds the training draws never use: they are below 2**31), with dense attention."""
    rows = [copy_window_spans(length, (1 << 40) + i) for i in range(n)]
    ids = torch.stack([w for w, _ in rows])
    nll = F.cross_entropy(dense_logits(model, ids[:, :-1]).float().transpose(1, 2), ids[:, 1:], reduction="none")
    picked = [nll[r, dst + cue - 1: dst + size - 1] for r, (_, spans) in enumerate(rows) for _, dst, size in spans]
    return float(torch.cat(picked).mean())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--copy-steps", type=int, default=400)
    ap.add_argument("--copy-length", type=int, default=64)
    ap.add_argument("--copy-batch", type=int, default=32)
    ap.add_argument("--copy-lr", type=float, default=None, help="default: the retrieval preset's")
    ap.add_argument("--dense-steps", type=int, default=150)
    ap.add_argument("--context", type=int, default=1024, help="dense-stage window length")
    ap.add_argument("--batch", type=int, default=4, help="dense-stage windows per step")
    ap.add_argument("--every", type=int, default=100, help="probe every this many steps")
    ap.add_argument("--max-train-bytes", type=int, default=3_000_000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dense-lr", type=float, default=None, help="default: the retrieval preset's")
    ap.add_argument("--extend-steps", type=int, default=0,
                    help="more copy steps after the copy stage, on --extend-alphabet (a curriculum: letters first)")
    ap.add_argument("--extend-alphabet", default="0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ_",
                    help="the extension's copy-window characters; also the dense stage's copy rows' then")
    ap.add_argument("--extend-length", type=int, default=None,
                    help="the extension's copy-window length (default --copy-length; also the dense stage's copy rows')")
    ap.add_argument("--extend-inner", type=int, default=None,
                    help="the extension's copies inside a random sub-window of this many tokens")
    ap.add_argument("--save-final", default=None, help="save the model's state here at the end")
    ap.add_argument("--copy-share", type=float, default=0.0, help="share of dense-stage rows that are copy windows")
    ap.add_argument("--copy-checkpoint", default=None,
                    help="model state after the copy stage: loaded (stage skipped) when the file exists, else saved")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    w = args.width
    base = PRESETS["retrieval"]
    tc = dataclasses.replace(base, layers=args.layers, hidden=w, heads=args.heads, q_lora=min(w, 128),
                             kv_lora=min(w, 128), nope=32, rope=base.rope, v=32, mlp=3 * w, index_heads=2,
                             index_dim=32, topk=64, context=args.context, batch=args.batch, contexts=None,
                             copy_steps=args.copy_steps, copy_length=args.copy_length, copy_batch=args.copy_batch,
                             copy_lr=base.copy_lr if args.copy_lr is None else args.copy_lr,
                             dense_steps=args.dense_steps, max_train_bytes=args.max_train_bytes,
                             copy_share=args.copy_share, lr=base.lr if args.dense_lr is None else args.dense_lr)
    torch.manual_seed(tc.seed)
    model = tc.init_weights(build_empty(tc.model_config(), "cpu", torch.float32))
    corpus, test = load_corpus("train", max_bytes=tc.max_train_bytes), load_corpus("test")
    gen = torch.Generator().manual_seed(tc.seed)
    curve, t0 = [], time.perf_counter()

    def probe(stage: str, step: int) -> None:
        res = copy_probe(model, test, dense=True)  # the indexers are untrained: their top-k hides keys at random
        win = copy_window_nll(model, tc.copy_length)
        curve.append({"stage": stage, "step": step, "probe_nll": res["nll"], "by_distance": res["nll_by_distance"],
                      "copy_window_nll": win, "seconds": time.perf_counter() - t0})
        dist = " ".join(f"d{d} {v:.2f}" for d, v in res["nll_by_distance"].items())
        print(f"{stage} step {step}: copy probe {res['nll']:.3f} nats/byte ({dist}; hex chance {res['chance']:.3f}); "
              f"copied bytes of copy windows {win:.3f} {time.perf_counter() - t0:.0f} s", flush=True)

    probe("init", 0)
    logs = {}
    plan = [("copy", tc.copy_steps, tc.copy_lr, tc)]
    if args.extend_steps > 0:
        tc = dataclasses.replace(tc, copy_alphabet=args.extend_alphabet,
                                 copy_length=args.extend_length or tc.copy_length, copy_inner=args.extend_inner)
        plan.append(("copy", args.extend_steps, tc.copy_lr, tc))
    plan.append(("dense", tc.dense_steps, tc.lr, tc))
    for j, (stage, steps, lr, stage_tc) in enumerate(plan):
        if steps <= 0:
            continue
        label = "extend" if j > 0 and stage == "copy" else stage
        ckpt = args.copy_checkpoint if label == "copy" else None
        if ckpt and os.path.exists(ckpt):
            model.load_state_dict(torch.load(ckpt))
            probe("copy (loaded)", steps)
            continue

        def every(next_step, opt, label=label, steps=steps):  # run_stage's checkpoint hook: probe as it trains
            if next_step % args.every == 0 and next_step < steps:
                probe(label, next_step)

        log = run_stage(model, corpus, stage, steps, lr, stage_tc, gen, progress=False, log_every=args.every,
                        checkpoint=every, checkpoint_every_s=0.0)
        logs[label] = {"steps": log["steps_done"], "seconds": log["seconds"],
                       "lm": [(r["step"], r["lm"]) for r in log["curve"]]}
        print(f"{label}: {log['steps_done']} steps in {log['seconds']:.0f} s, LM loss "
              + " ".join(f"{r['step']}:{r['lm']:.2f}" for r in log["curve"]), flush=True)
        probe(label, steps)
        if ckpt:
            torch.save(model.state_dict(), ckpt)
    if args.save_final:
        torch.save(model.state_dict(), args.save_final)
    print(json.dumps({"args": vars(args), "train_config": dataclasses.asdict(tc), "probe": curve, "stages": logs}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
