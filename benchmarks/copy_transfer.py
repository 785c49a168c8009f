"""Does a trained testbed model copy beyond letters, and does it retrieve with dense attention? On a checkpoint
(``benchmarks.retrieval_testbed``'s ``WORK_DIR/model``):

  (a) copy reach per alphabet: the copied symbols' NLL in held-out copy windows of ``--length`` tokens, one copy
      per 64 tokens at log-uniform distances (``probe.copy_reach``), in letters, digits, hex digits and the 95
      printable characters, against chance ln(alphabet size). The copy stage forms its copier on letters; a copier
      that copies letters only cannot copy the digits and hex names of the retrieval tasks;
  (b) retrieval exact match on held-out RULER-style items (``tasks.make_items``) with dense attention in every
      layer (``trainfwd.dense_logits``) and with the model's own top-k, so a failure of the model and a failure of
      its indexers can be told apart.

    python -m benchmarks.copy_transfer --checkpoint runs/testbed/model                  # CPU, a few minutes
    python -m benchmarks.copy_transfer --checkpoint runs/testbed/model --items 0        # (a) only, seconds
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import run_metadata, write_results  # noqa: E402
from indexcache.checkpoint import load_model  # noqa: E402
from indexcache.tools.corpus import load_corpus  # noqa: E402
from indexcache.tools.probe import copy_reach  # noqa: E402
from indexcache.tools.tasks import COPY_ALPHABET, HELDOUT_SEED_BASE, TASKS, copy_alphabet_of, make_items  # noqa: E402
from indexcache.tools.trainfwd import dense_logits  # noqa: E402

ALPHABETS = {"letters": COPY_ALPHABET, "digits": b"0123456789", "hex": b"0123456789abcdef",
             "printable95": copy_alphabet_of(95)}


@torch.no_grad()
def retrieval(model, test, tasks, length: int, n: int) -> dict:
    """{task: {"dense": exact-match rate, "own top-k": exact-match rate}} on ``n`` held-out items per task."""
    out = {}
    for task in tasks:
        hits = {"dense": 0, "own top-k": 0}
        for item in make_items(test, [task], length, n, HELDOUT_SEED_BASE, heldout=True):
            ids = item.ids()[None].to(next(model.parameters()).device)
            a = len(item.answer)
            for mode in hits:
                logits = dense_logits(model, ids[:, :-1]) if mode == "dense" else model(ids[:, :-1]).logits
                hits[mode] += bool((logits[0, -a:].argmax(-1) == ids[0, -a:]).all())
        out[task] = {mode: h / n for mode, h in hits.items()}
        print(f"retrieval {task} @{length}: " + ", ".join(f"{m} {v:.3f}" for m, v in out[task].items()), flush=True)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--length", type=int, default=1024, help="(a) copy window length")
    ap.add_argument("--windows", type=int, default=4, help="(a) windows per alphabet")
    ap.add_argument("--retrieval-length", type=int, default=2048)
    ap.add_argument("--items", type=int, default=4, help="(b) held-out items per task (0: skip (b))")
    ap.add_argument("--tasks", default="passkey,kv_single,needle_multi")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--results", default=None, help="also write the JSON as NAME.json (common.write_results)")
    args = ap.parse_args(argv)
    tasks = args.tasks.split(",")
    bad = [t for t in tasks if t not in TASKS]
    if bad:
        ap.error(f"unknown tasks {bad}; tasks are {TASKS}")
    torch.set_num_threads(args.threads)
    model = load_model(args.checkpoint, device=args.device)
    reach = {}
    for name, alphabet in ALPHABETS.items():
        nll = copy_reach(model, args.length, windows=args.windows, alphabet=alphabet)
        reach[name] = {"nll": nll, "chance": math.log(len(alphabet))}
        print(f"copy reach @{args.length} {name}: {nll:.3f} nats (chance {math.log(len(alphabet)):.3f})", flush=True)
    payload = {"meta": run_metadata(), "args": vars(args), "copy_reach": reach}
    if args.items > 0:
        payload["retrieval"] = retrieval(model, load_corpus("test"), tasks, args.retrieval_length, args.items)
    print(json.dumps(payload))
    if args.results:
        write_results(args.results, payload)
    return 0


if __name__ == "__main__":
    sys.exit(main())
