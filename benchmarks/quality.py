"""Quality results for docs/quality.md: train the stdlib DSA model, then compare patterns.

Rows: full DSA; uniform keep 1/2, 1/4, 1/8; greedy keep 1/2, 1/4, 1/8 (one greedy run, patterns with the same
number of F layers as the uniform ones); distilled uniform 1/2 and 1/4; and a control: the all-F model trained by
the same distillation steps ("DSA + same extra steps"), since distillation also trains the rest of the model.
Columns: held-out loss / bits per byte, retrieval accuracy at several lengths, mean dense-attention mass covered.

    python benchmarks/quality.py --preset gpu --budget 540 --train-share 0.65 --out-dir runs/quality  # one H200, ~9 min
    python benchmarks/quality.py --preset fixture --budget 900 --out-dir runs/q-cpu  # CPU, smaller
Stage budgets are turned into fixed step counts by timing a few steps first, so the recorded step counts
rebuild the model with ``indexcache train --preset gpu --dense-steps .. --warmup-steps .. --sparse-steps ..``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import run_metadata, write_results  # noqa: E402
from indexcache.checkpoint import build_empty, load_model  # noqa: E402
from indexcache.pattern import IndexPattern  # noqa: E402
from indexcache.tools.corpus import load_corpus  # noqa: E402
from indexcache.tools.distill import distill  # noqa: E402
from indexcache.tools.evaluate import evaluate  # noqa: E402
from indexcache.tools.overlap import model_overlap, write_heatmap_png  # noqa: E402
from indexcache.tools.search import calibration_batches, greedy_search  # noqa: E402
from indexcache.tools.train import PRESETS, TrainConfig, run_stage, train  # noqa: E402


def step_seconds(tc: TrainConfig, device, corpus, stage: str, n: int = 3) -> float:
    model = build_empty(tc.model_config(), device, torch.float32).init_random(tc.seed)
    g = torch.Generator().manual_seed(123)
    run_stage(model, corpus, stage, 1, 1e-4, tc, g, progress=False)  # warm-up (kernels, allocator)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    run_stage(model, corpus, stage, n, 1e-4, tc, g, progress=False)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t) / n


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="gpu", choices=sorted(PRESETS))
    ap.add_argument("--budget", type=float, default=200, help="seconds for everything")
    ap.add_argument("--train-share", type=float, default=0.55, help="share of the budget spent on training")
    ap.add_argument("--out-dir", default="runs/quality")
    ap.add_argument("--fixture-out", help="also train the small test fixture here (preset 'fixture')")
    ap.add_argument("--model", help="skip training: evaluate this checkpoint")
    ap.add_argument("--lengths", type=int, nargs="+")
    ap.add_argument("--n-retrieval", type=int, default=48)
    args = ap.parse_args()
    t_start = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out = os.environ.get("OUT") or args.out_dir
    os.makedirs(args.out_dir, exist_ok=True)
    res = {"meta": run_metadata(), "preset": args.preset, "budget_s": args.budget}

    def save():
        res["elapsed_s"] = time.perf_counter() - t_start
        write_results("quality", res, [args.out_dir])

    if args.fixture_out:
        t = time.perf_counter()
        _, flog = train(dataclasses.replace(PRESETS["fixture"], time_budget_s=45), device, args.fixture_out,
                        progress=False)
        res["fixture"] = {"seconds": time.perf_counter() - t,
                          "steps": {s["stage"]: s["steps_done"] for s in flog["stages"]},
                          "final": {s["stage"]: s["curve"][-1] for s in flog["stages"]}}
        print("fixture", res["fixture"], flush=True)
        save()

    tc = PRESETS[args.preset]
    corpus = load_corpus("train")
    model_dir = args.model or os.path.join(args.out_dir, "model")
    train_budget = args.train_share * args.budget
    ts = {s: step_seconds(tc, device, corpus, s) for s in ("dense", "warmup", "sparse")}
    res["step_seconds"] = ts
    if not args.model:
        remaining = train_budget - (time.perf_counter() - t_start)
        tc = dataclasses.replace(tc, dense_steps=max(10, int(0.65 * remaining / ts["dense"])),
                                 warmup_steps=max(5, int(0.10 * remaining / ts["warmup"])),
                                 sparse_steps=max(5, int(0.25 * remaining / ts["sparse"])),
                                 time_budget_s=remaining * 1.3)
        _, log = train(tc, device, model_dir, progress=False)
        res["training"] = {"train_config": dataclasses.asdict(tc), "seconds": log["seconds"],
                           "corpus_train_files": log["corpus_train_files"], "corpus_train_bytes": log["corpus_train_bytes"],
                           "stages": [{k: s[k] for k in ("stage", "steps_done", "steps_planned", "seconds")}
                                      | {"curve": s["curve"]} for s in log["stages"]]}
        print("trained", {s["stage"]: (s["steps_done"], round(s["seconds"], 1)) for s in log["stages"]}, flush=True)
        save()
    ctx = tc.context
    lengths = tuple(args.lengths or [L for L in (512, 1024, 2048, 4096) if L <= ctx])
    test = load_corpus("test")
    model = load_model(model_dir, device=device)
    N = model.config.num_layers

    # overlap heatmap
    ov = model_overlap(model, [w[None].to(device) for w in test.sequential_windows(ctx, 4)])
    res["overlap"] = {"matrix": ov.tolist(), "adjacent_mean": float(sum(ov[i, i + 1] for i in range(N - 1)) / (N - 1)),
                      "min": float(ov.min()), "topk": model.config.index_topk, "tokens": 4 * ctx}
    write_heatmap_png(ov, os.path.join(args.out_dir, "quality_overlap.png"))
    save()

    # greedy search (one run down to the 1/8 F count; 1/2 and 1/4 are points on its path)
    uniform = {f: IndexPattern.keep(N, f) for f in ("1/2", "1/4", "1/8")}
    target = N - uniform["1/8"].num_full
    cal = calibration_batches(corpus, 4, ctx, 2, seed=1, device=device)
    sr = greedy_search(model, cal, target, progress=False)
    res["search"] = sr.to_json()
    print("search", sr.pattern, sr.layer_forwards, sr.naive_layer_forwards, round(sr.seconds, 1), flush=True)
    greedy = {f: sr.patterns_by_num_full[u.num_full] for f, u in uniform.items()}
    save()

    rows = [("full DSA", model_dir, None)]
    rows += [(f"uniform {f}", model_dir, str(p)) for f, p in uniform.items()]
    rows += [(f"greedy {f}", model_dir, str(p)) for f, p in greedy.items()]

    def ev(name, path, pattern):
        m = load_model(path, device=device)
        r = evaluate(m, pattern, test=test, context=ctx, lengths=lengths, n_retrieval=args.n_retrieval,
                     heldout_windows=24, batch=2 if ctx >= 2048 else 4, device=device, progress=False)
        r["row"] = name
        res.setdefault("rows", []).append(r)
        acc = {L: round(v["accuracy"], 3) for L, v in r["retrieval"].items()}
        print(name, r["pattern"], round(r["heldout"]["loss"], 4), acc, flush=True)
        save()

    for name, path, pattern in rows:
        ev(name, path, pattern)

    # distillation: the rest of the budget, split over 1/2, 1/4 and the all-F control
    left = args.budget - (time.perf_counter() - t_start) - 10 * 4  # keep ~10 s per remaining eval
    per = max(left / 3, 5)
    wsteps = max(5, int(0.3 * per / ts["warmup"]))
    ssteps = max(5, int(0.7 * per / ts["sparse"]))
    res["distill_steps"] = {"warmup": wsteps, "sparse": ssteps}
    for label, pat in (("distilled uniform 1/2", uniform["1/2"]), ("distilled uniform 1/4", uniform["1/4"]),
                       ("DSA + same extra steps", IndexPattern.all_full(N))):
        d_out = os.path.join(args.out_dir, "distill_" + label.split()[-1].replace("/", "_"))
        _, dlog = distill(model_dir, str(pat), d_out, warmup_steps=wsteps, sparse_steps=ssteps, batch=tc.batch,
                          context=ctx, device=device, time_budget_s=per * 1.3, progress=False)
        res.setdefault("distill", []).append({"row": label, **{k: dlog[k] for k in ("pattern", "seconds")},
                                              "stages": [{k: s[k] for k in ("stage", "steps_done", "seconds", "curve")}
                                                         for s in dlog["stages"]]})
        ev(label, d_out, None)
    save()
    with open(os.path.join(args.out_dir, "quality_table.md"), "w") as f:
        f.write(markdown_table(res))
    if os.environ.get("OUT"):
        import shutil
        for name in ("quality.json", "quality_overlap.png", "quality_table.md"):
            shutil.copy(os.path.join(args.out_dir, name), os.path.join(out, name))
    print(markdown_table(res))
    return 0


def markdown_table(res: dict) -> str:
    rows = res.get("rows", [])
    if not rows:
        return ""
    lengths = list(rows[0]["retrieval"])
    head = ["config", "pattern", "#F", "held-out loss", "bits/byte"] + [f"retrieval@{L}" for L in lengths] \
        + ["attn mass covered"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        mass = sum(x["attention_mass_used"] for x in r["layers"]) / len(r["layers"])
        cells = [r["row"], f"`{r['pattern']}`", str(r["num_full"]), f"{r['heldout']['loss']:.4f}",
                 f"{r['heldout']['bits_per_byte']:.4f}"]
        cells += [f"{r['retrieval'][L]['accuracy']:.3f} (n={r['retrieval'][L]['n']})" for L in lengths]
        cells.append(f"{mass:.3f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
