"""Where decode time goes: per-kernel GPU time of one decode step at a long context, eager and replayed from the
CUDA graph, over a random-filled cache (no prefill).

    python -m benchmarks.decode_profile --layers 4 --context 200K --batches 1,32 --patterns FFFF,FSSS
    python -m benchmarks.decode_profile --layers 4 --context 200K --batches 1,4 --patterns FFFF --compile-modes on \
        --decode-topk-modes on,off      # decode top-k: topk_rows_decode (on) against topk_rows (off)

Prints, per (pattern, batch): the graph step time, and the kernels sorted by GPU time per step (torch.profiler /
CUPTI); writes everything to ``decode_profile.json`` ($OUT, else runs/benchmarks).
"""
from __future__ import annotations

if __name__ == "__main__":  # without a GPU, refuse before the seconds-long torch import
    from benchmarks.require_gpu import require_gpu

    require_gpu("python -m benchmarks.decode_profile", "python -m benchmarks.decode_profile --device cpu --model tiny "
                "--layers 4 --context 256 --batches 1")

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.common import run_metadata, table, write_results
from benchmarks.e2e import add_arguments, decode_ready_engine, parse_ctx, sync
from indexcache.checkpoint import build_empty
from indexcache.engine import EngineConfig
from indexcache.model.linear import use_fp8_storage
from indexcache.presets import preset_config


def kernel_table(prof, steps: int) -> list[dict]:
    """Kernels (and copies) by self GPU time per step; ops that only launch kernels have none of their own."""
    rows = []
    for e in prof.key_averages():
        t = getattr(e, "self_device_time_total", None)
        if t is None:
            t = getattr(e, "self_cuda_time_total", 0)
        if t > 0:
            rows.append({"kernel": e.key[:110], "us_per_step": t / steps, "calls_per_step": e.count / steps})
    rows.sort(key=lambda r: -r["us_per_step"])
    return rows


def profile_step(fn, steps: int) -> tuple[list[dict], float]:
    fn()
    sync()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            fn()
        sync()
    rows = kernel_table(prof, steps)
    return rows, sum(r["us_per_step"] for r in rows)


def build_model(args):
    """(config, random model) of ``args.model`` with ``args.layers`` layers (0 or None: all), bf16 on CUDA and fp32
    on CPU, its weights quantised to FP8 blocks when ``args.weight_dtype`` is fp8."""
    cfg = preset_config(args.model)
    cfg = cfg.replace(num_layers=args.layers) if args.layers else cfg
    if getattr(args, "max_position_embeddings", None):  # e.g. a 1M-token profile of a 200K model (RoPE tables)
        cfg = cfg.replace(max_position_embeddings=args.max_position_embeddings)
    dev = args.device
    model = build_empty(cfg, dev, torch.bfloat16 if dev == "cuda" else torch.float32).init_random(args.seed).eval()
    if args.weight_dtype == "fp8":
        use_fp8_storage(model, quantize=True)
        if dev == "cuda":
            torch.cuda.empty_cache()
    return cfg, model


def host_split(eng, steps: int) -> dict:
    """Wall time of one decode step split into scheduling + input preparation, graph launch (input copies and
    replay), and sampling (which waits for the GPU: its share is mostly GPU time)."""
    spent = {"prepare_ms": 0.0, "launch_ms": 0.0, "sample_ms": 0.0}
    orig = {"prepare": eng.runner.prepare, "run": eng.graphs.run if eng.graphs else None, "sample": eng._sample}

    def timed(key, fn):
        def wrapper(*a, **k):
            t0 = time.perf_counter()
            out = fn(*a, **k)
            spent[key] += (time.perf_counter() - t0) * 1e3
            return out
        return wrapper

    eng.runner.prepare = timed("prepare_ms", orig["prepare"])
    if eng.graphs is not None:
        eng.graphs.run = timed("launch_ms", orig["run"])
    eng._sample = timed("sample_ms", orig["sample"])
    try:
        sync()
        t0 = time.perf_counter()
        for _ in range(steps):
            eng.step()
        sync()
        total = (time.perf_counter() - t0) * 1e3
    finally:
        eng.runner.prepare, eng._sample = orig["prepare"], orig["sample"]
        if eng.graphs is not None:
            eng.graphs.run = orig["run"]
    out = {k: v / steps for k, v in spent.items()}
    out["step_ms"] = total / steps
    out["other_host_ms"] = out["step_ms"] - sum(v for k, v in out.items() if k != "step_ms")
    return out


def main(argv=None) -> int:
    p = add_arguments(argparse.ArgumentParser(description=__doc__.split("\n")[0]))
    p.add_argument("--context", default="200K")
    p.add_argument("--batches", default="1,32")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--compile-modes", default="off,on", help="decode glue eager (off) and/or torch.compile'd (on)")
    p.add_argument("--moe-kernel-modes", default="on", help="small-batch Triton MoE kernel on and/or off")
    p.add_argument("--decode-topk-modes", default="on",
                   help="FP8 indexer decode top-k: topk_rows_decode (on, the engine default) and/or topk_rows (off)")
    p.add_argument("--top", type=int, default=40, help="kernels printed per case")
    p.set_defaults(top=40)
    p.set_defaults(layers=4, patterns="FFFF,FSSS", name="decode_profile")
    args = p.parse_args(argv)
    dev = args.device
    ctx = parse_ctx(args.context)
    cfg, model = build_model(args)
    res = {"meta": run_metadata(), "args": vars(args), "cases": []}
    cases = [(pat, int(bs), mode, moe, tk) for pat in args.patterns.split(",") for bs in args.batches.split(",")
             for mode in args.compile_modes.split(",") for moe in args.moe_kernel_modes.split(",")
             for tk in args.decode_topk_modes.split(",")]
    for pat, bs, mode, moe, tk in cases:
        args.no_compile = mode == "off"
        args.moe_small_batch_kernel = moe == "on"
        args.decode_topk_max_rows = EngineConfig.decode_topk_max_rows if tk == "on" else 0
        eng, seqs = decode_ready_engine(model, pat, ctx, args, bs, steps=4 * args.steps + 16)
        eng.step()  # graph capture (CUDA) and warm-up
        sync()
        t0 = time.perf_counter()
        for _ in range(args.steps):
            eng.step()
        sync()
        step_ms = (time.perf_counter() - t0) / args.steps * 1e3
        split = host_split(eng, args.steps)
        runner = eng.runner
        b = runner.prepare([(s.token_ids, s.num_computed - 1, 1, s.block_table) for s in seqs])
        case = {"pattern": pat, "batch": bs, "compile": mode, "moe_kernel": moe, "decode_topk": tk,
                "decode_topk_used": getattr(eng.backend, "decode_topk_workspace", lambda n: None)(bs) is not None,
                "context": ctx,
                "weight_dtype": args.weight_dtype, "layers": cfg.num_layers,
                "graph_step_ms": step_ms,
                "per_layer_ms": step_ms / cfg.num_layers, **{"split_" + k: v for k, v in split.items()}}
        if dev == "cuda":
            case["eager"], case["eager_kernel_us"] = profile_step(lambda: runner.forward(b), args.steps)
            case["eager_kernels_per_step"] = sum(r["calls_per_step"] for r in case["eager"])
            case["eager"] = case["eager"][:args.top]
            if eng.graphs is not None:
                g = eng.graphs
                case["graph"], case["graph_kernel_us"] = profile_step(lambda: g.run(b), args.steps)
                case["graph_kernels_per_step"] = sum(r["calls_per_step"] for r in case["graph"])
                case["graph"] = case["graph"][:args.top]
                graph = g.graphs[g.bucket(bs)][0]  # replay alone: no host work (scheduling, inputs, sampling)
                sync()
                t0 = time.perf_counter()
                for _ in range(4 * args.steps):
                    graph.replay()
                sync()
                case["replay_ms"] = (time.perf_counter() - t0) / (4 * args.steps) * 1e3
        res["cases"].append(case)
        print(f"\n== {pat} batch {bs} compile {mode} moe-kernel {moe} decode-topk {tk} ctx {ctx}: graph step "
              f"{step_ms:.3f} ms ({step_ms / cfg.num_layers:.3f} ms/layer), replay alone "
              f"{case.get('replay_ms', 0):.3f} ms; kernels eager {case.get('eager_kernel_us', 0):.0f} us, graph "
              f"{case.get('graph_kernel_us', 0):.0f} us in {case.get('graph_kernels_per_step', 0):.0f} kernels; "
              "host split " + ", ".join(f"{k} {v:.3f}" for k, v in split.items()), flush=True)
        for r in (case.get("graph") or case.get("eager") or [])[:args.top]:
            print(f"  {r['us_per_step']:9.1f} us  x{r['calls_per_step']:5.1f}  {r['kernel']}")
        del eng, seqs, b
        if dev == "cuda":
            torch.cuda.empty_cache()
    for path in write_results(args.name, res):
        print("wrote", path)
    print(table(res["cases"], ["pattern", "batch", "compile", "moe_kernel", "decode_topk", "decode_topk_used",
                               "graph_step_ms", "replay_ms", "graph_kernel_us", "graph_kernels_per_step",
                               "split_prepare_ms", "split_launch_ms", "split_sample_ms"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
