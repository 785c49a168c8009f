"""Does a trained testbed model copy beyond letters, and does it retrieve with dense attention? On a checkpoint
(``benchmarks.retrieval_testbed``'s ``WORK_DIR/model``):

  (a) copy reach per alphabet: the copied symbols' NLL in held-out copy windows of ``--length`` tokens, one copy
      per 64 tokens at log-uniform distances (``probe.copy_reach``), in letters, digits, hex digits and the 95
      printable characters, against chance ln(alphabet size). The copy stage forms its copier on letters; a copier
      that copies letters only cannot copy the digits and hex names of the retrieval tasks;
  (b) retrieval exact match on held-out RULER-style items (``tasks.make_items``) with dense attention in every
      layer (``trainfwd.dense_logits``) and with the model's own top-k, so a failure of the model and a failure of
      its indexers can be told apart;
  (c) with ``--fact-prefix N``: N held-out ``kv_single`` items asked twice, with the suite's query
      (``assert TABLE_…["key_…"] == ``) and with one that repeats the fact's own words before the value
      (``TABLE_… = {"key_…": ``), both with the model's own top-k: a model that answers the second and not the first
      can find and copy the value but has not learned to bridge the query's form to the fact's.

    python -m benchmarks.copy_transfer --checkpoint runs/testbed/model                  # CPU, a few minutes
    python -m benchmarks.copy_transfer --checkpoint runs/testbed/model --items 0        # (a) only, seconds
    python -m benchmarks.copy_transfer --checkpoint runs/testbed/model --items 0 --fact-prefix 16   # (a) and (c)
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
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


def answers(logits_of, item, device) -> bool:
    """Whether greedy decoding gives ``item``'s answer exactly: every answer position's argmax under teacher
    forcing (``logits_of(ids [1,T]) -> [1,T,vocab]``) is the answer's byte."""
    ids = item.ids()[None].to(device)
    a = len(item.answer)
    return bool((logits_of(ids[:, :-1])[0, -a:].argmax(-1) == ids[0, -a:]).all())


@torch.no_grad()
def retrieval(model, test, tasks, length: int, n: int) -> dict:
    """{task: {"dense": exact-match rate, "own top-k": exact-match rate}} on ``n`` held-out items per task."""
    out = {}
    for task in tasks:
        hits = {"dense": 0, "own top-k": 0}
        for item in make_items(test, [task], length, n, HELDOUT_SEED_BASE, heldout=True):
            dev = next(model.parameters()).device
            hits["dense"] += answers(lambda ids: dense_logits(model, ids), item, dev)
            hits["own top-k"] += answers(lambda ids: model(ids).logits, item, dev)
        out[task] = {mode: h / n for mode, h in hits.items()}
        print(f"retrieval {task} @{length}: " + ", ".join(f"{m} {v:.3f}" for m, v in out[task].items()), flush=True)
    return out


def fact_prefix_item(item):
    """The kv_single ``item`` with its query replaced by the fact's own words before the value."""
    text = bytes(t for t in item.prompt[1:] if t < 256)
    at = text.rfind(b"\nassert ")
    m = re.fullmatch(rb'\nassert (\w+)\["(\w+)"\] == ', text[at:])
    if item.task != "kv_single" or m is None:
        raise ValueError(f"fact_prefix_item needs a kv_single item, got task {item.task!r}")
    table, key = m.groups()
    query = b"\n" + table + b' = {"' + key + b'": '
    return dataclasses.replace(item, prompt=item.prompt[:len(item.prompt) - (len(text) - at)] + list(query))


@torch.no_grad()
def fact_prefix(model, test, length: int, n: int) -> dict:
    """{"suite query": rate, "fact-prefix query": rate}: exact match with the own top-k on ``n`` kv_single items."""
    hits = {"suite query": 0, "fact-prefix query": 0}
    for item in make_items(test, ["kv_single"], length, n, HELDOUT_SEED_BASE, heldout=True):
        for mode, it in (("suite query", item), ("fact-prefix query", fact_prefix_item(item))):
            hits[mode] += answers(lambda ids: model(ids).logits, it, next(model.parameters()).device)
    out = {mode: h / n for mode, h in hits.items()}
    print(f"kv_single @{length}, own top-k: " + ", ".join(f"{m} {v:.3f}" for m, v in out.items()), flush=True)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--length", type=int, default=1024, help="(a) copy window length")
    ap.add_argument("--windows", type=int, default=4, help="(a) windows per alphabet")
    ap.add_argument("--retrieval-length", type=int, default=2048)
    ap.add_argument("--items", type=int, default=4, help="(b) held-out items per task (0: skip (b))")
    ap.add_argument("--tasks", default="passkey,kv_single,needle_multi")
    ap.add_argument("--fact-prefix", type=int, default=0,
                    help="(c) kv_single items asked with the suite's query and with the fact's own prefix (0: skip)")
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
    if args.fact_prefix > 0:
        payload["fact_prefix"] = fact_prefix(model, load_corpus("test"), args.retrieval_length, args.fact_prefix)
    print(json.dumps(payload))
    if args.results:
        write_results(args.results, payload)
    return 0


if __name__ == "__main__":
    sys.exit(main())
