"""CLI subcommands of the quality tools: ``train``, ``overlap``, ``search``, ``distill``, ``eval``.

``register(subparsers)`` adds them to the ``indexcache`` command (indexcache/cli.py calls it).
Every command prints a short summary and writes its full result as JSON with ``--json``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys


def _device(arg: str | None) -> str:
    import torch

    return arg or ("cuda" if torch.cuda.is_available() else "cpu")


def _dump(obj, path: str | None) -> None:
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump(obj, f, indent=1, default=str)
        print(f"wrote {path}")


def _text_batches(args, model, device):
    """Token batches from --text files (encoded by the checkpoint's tokenizer; bytes when it has none) or, by
    default, the held-out stdlib split (byte-level models only)."""
    import torch

    from ..tokenizer import ByteTokenizer, find_tokenizer
    from .corpus import load_corpus

    tok = find_tokenizer(args.model)
    L = args.length or model.config.index_topk * 8
    if args.text:
        toks = []
        for path in args.text:
            with open(path, "rb") as f:
                data = f.read()
            if tok is None or isinstance(tok, ByteTokenizer):
                toks += [ByteTokenizer.BOS] + list(data) + [ByteTokenizer.EOS]
            else:
                toks += tok.encode(data.decode("utf-8", errors="replace"))
        n = len(toks) // L
        if n == 0:
            raise ValueError(f"--text holds {len(toks)} tokens, fewer than one window of --length {L}")
        ids = torch.tensor(toks[: n * L]).view(n, L)[: args.num_seqs]
    else:
        _need_byte_model(args.model, tok, "the default text (the held-out stdlib split) is byte-level: pass --text")
        ids = load_corpus("test").sequential_windows(L, args.num_seqs)
    return [b.to(device) for b in ids.split(args.batch)]


def _need_byte_model(model: str, tok, what: str) -> None:
    from ..tokenizer import ByteTokenizer

    if tok is not None and not isinstance(tok, ByteTokenizer):
        raise ValueError(f"{model} has a {type(tok).__name__}, not a byte tokenizer; {what}")


def _load(args, pattern=None):
    ctx = getattr(args, "parallel", None)
    if ctx is not None:  # a rank of ``-tp N``: this rank's shard, on its own device
        from ..distributed import load_sharded
        return load_sharded(args.model, ctx, index_pattern=pattern)[0]
    from ..checkpoint import load_model

    # the quality tools compute in fp32 (and train indexers): FP8 checkpoints are dequantised
    return load_model(args.model, device=_device(args.device), index_pattern=pattern, weight_dtype="bf16")


def _parallel(cmd):
    """``cmd`` as is, or with ``-tp N`` / ``--enable-expert-parallel`` on N spawned ranks (each loads its shard,
    every rank runs the same command; rank 0 prints and writes the results)."""
    def run(args) -> int:
        tp, ep = args.tensor_parallel_size, args.enable_expert_parallel
        if tp < 1:
            raise ValueError(f"--tensor-parallel-size must be >= 1, got {tp}")
        if tp == 1 and not ep:
            return cmd(args)
        from ..distributed.launch import RankProcesses

        ranks = RankProcesses(tp, device_type="cuda" if _device(args.device).startswith("cuda") else "cpu",
                              expert_parallel=ep)
        try:
            plain = argparse.Namespace(**{k: v for k, v in vars(args).items() if k != "func"})
            code, error = ranks.collective_rpc(_run_on_rank, cmd, plain)[0]
        finally:
            ranks.close()
        if error:
            raise ValueError(error)  # bad input, reported like a one-process run
        return code
    return run


def _run_on_rank(ctx, cmd, args) -> tuple[int, str | None]:
    args.parallel = ctx
    if ctx.rank:  # one copy of the output
        args.json = args.png = None
        sys.stdout = sys.stderr = open(os.devnull, "w")
    try:
        return cmd(args), None
    except ValueError as e:  # every rank sees the same bad input
        return 2, str(e)


def cmd_train(args) -> int:
    import dataclasses

    from .train import PRESETS, train

    tc = PRESETS[args.preset]
    over = {k: v for k, v in dict(layers=args.layers, hidden=args.hidden, context=args.context, topk=args.topk,
                                  batch=args.batch, dense_steps=args.dense_steps, warmup_steps=args.warmup_steps,
                                  sparse_steps=args.sparse_steps, seed=args.seed,
                                  time_budget_s=args.time_budget).items() if v is not None}
    tc = dataclasses.replace(tc, **over)
    _, log = train(tc, _device(args.device), args.out, progress=True)
    for s in log["stages"]:
        last = s["curve"][-1] if s["curve"] else {}
        print(f"{s['stage']:7s} {s['steps_done']}/{s['steps_planned']} steps in {s['seconds']:.0f}s  "
              f"lm {last.get('lm')}  indexer KL {last.get('index_kl')}")
    print(f"saved {args.out}")
    _dump(log, args.json)
    return 0


def cmd_overlap(args) -> int:
    from .overlap import model_overlap, write_heatmap_png

    model = _load(args)
    ov = model_overlap(model, _text_batches(args, model, _device(args.device)))
    res = {"model": args.model, "topk": model.config.index_topk, "overlap": ov.tolist(),
           "adjacent_mean": float(sum(ov[i, i + 1] for i in range(len(ov) - 1)) / max(len(ov) - 1, 1)),
           "offdiag_min": float(ov.min())}
    print(f"{len(ov)} layers, top-k {res['topk']}: adjacent-layer overlap {res['adjacent_mean']:.3f}, "
          f"minimum {res['offdiag_min']:.3f}")
    if args.png:
        write_heatmap_png(ov, args.png)
        print(f"wrote {args.png}")
    _dump(res, args.json)
    return 0


def cmd_search(args) -> int:
    from ..pattern import IndexPattern
    from .corpus import load_corpus
    from .search import calibration_batches, greedy_search
    from ..tokenizer import find_tokenizer

    _need_byte_model(args.model, find_tokenizer(args.model), "search calibrates on the byte-level stdlib corpus")
    model = _load(args)
    N = model.config.num_layers
    if args.keep:
        target = N - IndexPattern.keep(N, args.keep).num_full
    elif args.target_shared is not None:
        target = args.target_shared
    else:
        raise ValueError("give --keep 1/N or --target-shared COUNT")
    L = args.length or 4 * model.config.index_topk
    batches = calibration_batches(load_corpus(args.split), args.calib_seqs, L, args.batch, args.seed,
                                  _device(args.device))
    res = greedy_search(model, batches, target, fixed=tuple(args.fixed), naive=args.naive, progress=True,
                        max_rerank=args.max_rerank, pool=args.pool)
    out = res.to_json()
    print(res.pattern.describe())
    print("loss curve: " + " ".join(f"{x:.4f}" for x in out["loss_curve"]))
    print(f"layer-forwards {out['layer_forwards']} vs naive {out['naive_layer_forwards']} "
          f"(saved {out['layer_forwards_saved']})")
    for engine, flag in out["engine_flags"].items():
        print(f"  {engine}: {flag}")
    _dump(out, args.json)
    return 0


def cmd_distill(args) -> int:
    from ..tokenizer import find_tokenizer
    from .distill import distill

    _need_byte_model(args.model, find_tokenizer(args.model), "distill trains on the byte-level stdlib corpus")
    _, log = distill(args.model, args.pattern, args.out, warmup_steps=args.warmup_steps,
                     sparse_steps=args.sparse_steps, batch=args.batch, context=args.context, seed=args.seed,
                     device=_device(args.device), progress=True, parallel=getattr(args, "parallel", None),
                     index_rows=args.index_rows)
    print(f"distilled pattern {log['pattern']} -> {args.out}")
    _dump(log, args.json)
    return 0


def cmd_eval(args) -> int:
    from ..tokenizer import find_tokenizer
    from .corpus import load_corpus
    from .evaluate import evaluate

    _need_byte_model(args.model, find_tokenizer(args.model), "eval measures bits per byte on byte-level text")
    test = load_corpus("test")
    results = []
    for pat in args.patterns:
        model = _load(args)
        if pat != "model" and args.pool and "R" in pat:
            from ..pattern import IndexPattern

            pat = IndexPattern(pat, pool=args.pool)
        r = evaluate(model, None if pat == "model" else pat, test=test, context=args.context,
                     lengths=tuple(args.lengths), n_retrieval=args.n_retrieval, heldout_windows=args.windows,
                     batch=args.batch, device=_device(args.device), progress=True,
                     suite_lengths=tuple(args.suite_lengths) if args.suite_n else (), suite_n=args.suite_n,
                     suite_tasks=tuple(args.suite_tasks), suite_seed=args.suite_seed)
        results.append(r)
        acc = " ".join(f"{L}:{v['accuracy']:.2f}" for L, v in r["retrieval"].items())
        recall = [x["recall_vs_own_indexer"] for x in r["layers"] if "recall_vs_own_indexer" in x]
        mass = [x["attention_mass_used"] for x in r["layers"]]
        print(f"{r['pattern']}  loss {r['heldout']['loss']:.4f}  bpb {r['heldout']['bits_per_byte']:.4f}  "
              f"retrieval {acc}  top-k recall {sum(recall) / max(len(recall), 1):.3f}  "
              f"attention mass {sum(mass) / max(len(mass), 1):.3f}")
        if "suite" in r:
            for task, by_len in r["suite"]["tasks"].items():
                print(f"  {task:14s} " + " ".join(f"{L}:{v['exact_match']:.2f}" for L, v in by_len.items()))
            print("  mean           " + " ".join(f"{L}:{v:.2f}" for L, v in r["suite"]["mean_by_length"].items()))
    _dump({"model": args.model, "results": results}, args.json)
    return 0


def register(subparsers) -> None:
    from .ruler import DEFAULT_LENGTHS
    from .tasks import HELDOUT_SEED_BASE, TASKS

    def common(p, model=True):
        if model:
            p.add_argument("model", help="checkpoint folder")
        p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
        p.add_argument("--json", help="write the full result here")
        if model:
            p.add_argument("-tp", "--tensor-parallel-size", type=int, default=1,
                           help="ranks to shard the model over (GPUs; gloo processes on CPU)")
            p.add_argument("--enable-expert-parallel", action="store_true",
                           help="split routed experts by expert instead of by intermediate dim")

    t = subparsers.add_parser("train", help="train a small DSA model on the stdlib corpus (dense -> warm-up -> sparse)")
    common(t, model=False)
    t.add_argument("--preset", default="fixture", choices=["fixture", "gpu", "retrieval"])
    t.add_argument("--out", required=True, help="checkpoint folder to write")
    for name in ("layers", "hidden", "context", "topk", "batch", "dense-steps", "warmup-steps", "sparse-steps", "seed"):
        t.add_argument(f"--{name}", type=int)
    t.add_argument("--time-budget", type=float, help="seconds for the whole run (stages are cut short)")
    t.set_defaults(func=cmd_train)

    o = subparsers.add_parser("overlap", help="pairwise top-k overlap between layers: heatmap PNG + JSON")
    common(o)
    o.add_argument("--text", nargs="+", help="text files (default: the held-out stdlib split)")
    o.add_argument("--length", type=int, help="tokens per sequence (default 8 x top-k)")
    o.add_argument("--num-seqs", type=int, default=4)
    o.add_argument("--batch", type=int, default=2)
    o.add_argument("--png", help="write the heatmap here")
    o.set_defaults(func=_parallel(cmd_overlap))

    s = subparsers.add_parser("search", help="greedy F/S pattern search on calibration LM loss (cached prefix)")
    common(s)
    s.add_argument("--keep", help="target retention like 1/4 (same F count as the uniform pattern)")
    s.add_argument("--target-shared", type=int, help="number of layers to turn into S")
    s.add_argument("--calib-seqs", type=int, default=8)
    s.add_argument("--length", type=int, help="calibration sequence length (default 4 x top-k)")
    s.add_argument("--batch", type=int, default=4)
    s.add_argument("--split", default="train", choices=["train", "test"])
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--fixed", type=int, nargs="*", default=[0], help="layers that stay F (layer 0 always)")
    s.add_argument("--naive", action="store_true", help="run every candidate from the embedding (reference)")
    s.add_argument("--max-rerank", type=int, default=0,
                   help="also try re-rank (R) layers, at most this many (R: own indexer over the F layer's pool)")
    s.add_argument("--pool", type=int, help="candidate pool of F layers for R layers (default 4 x top-k)")
    s.set_defaults(func=_parallel(cmd_search))

    d = subparsers.add_parser("distill", help="multi-layer indexer distillation into a pattern; writes a checkpoint")
    common(d)
    d.add_argument("--pattern", required=True, help="F/S string or 1/N")
    d.add_argument("--out", required=True)
    d.add_argument("--warmup-steps", type=int, default=50)
    d.add_argument("--sparse-steps", type=int, default=50)
    d.add_argument("--batch", type=int, default=8)
    d.add_argument("--context", type=int)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--index-rows", type=int, help="query rows per window the indexer loss covers, drawn at random "
                   "each step (default: all; fewer make long windows' steps cheaper)")
    d.set_defaults(func=_parallel(cmd_distill))

    e = subparsers.add_parser("eval", help="held-out loss / bits per byte, long-context retrieval accuracy, top-k "
                              "recall against each layer's own indexer and the dense attention mass the used top-k "
                              "covers (means printed; per layer in --json)")
    common(e)
    e.add_argument("--patterns", nargs="+", default=["model"], help="'model' (its own), F/S/R strings or 1/N")
    e.add_argument("--context", type=int, default=512)
    e.add_argument("--lengths", type=int, nargs="+", default=[512, 1024])
    e.add_argument("--n-retrieval", type=int, default=32)
    e.add_argument("--windows", type=int, default=16)
    e.add_argument("--batch", type=int, default=4)
    e.add_argument("--suite-lengths", type=int, nargs="+", default=list(DEFAULT_LENGTHS),
                   help="lengths of the RULER-style retrieval suite (held-out synthetic tasks)")
    e.add_argument("--suite-n", type=int, default=16, help="suite items per task and length (0: skip the suite)")
    e.add_argument("--suite-tasks", nargs="+", default=list(TASKS), help=f"suite tasks, of {', '.join(TASKS)}")
    e.add_argument("--suite-seed", type=int, default=HELDOUT_SEED_BASE, help="held-out item seed (>= the base)")
    e.add_argument("--pool", type=int, help="candidate pool of F layers for R layers (default 4 x top-k)")
    e.set_defaults(func=_parallel(cmd_eval))


def main(argv=None) -> int:
    """Standalone entry (``python -m indexcache.tools.cli``) until the main CLI wires ``register`` in."""
    import argparse

    p = argparse.ArgumentParser(prog="indexcache-tools")
    register(p.add_subparsers(dest="command", required=True))
    args = p.parse_args(argv)
    try:
        return args.func(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
