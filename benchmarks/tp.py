"""Tensor-parallel end-to-end benchmark (issue 11): TTFT and single-request decode of the engine on N GPUs against
fewer, with random weights, for full DSA and IndexCache patterns.

    # 2 GPUs: glm-4.7-flash-dsa at TP 2 vs TP 1 at 200K (TTFT full and 1/4, decode); target TTFT(TP2) <= 0.6 TTFT(TP1)
    python -m benchmarks.tp --tp 1,2 --model glm-4.7-flash-dsa --contexts 200K --patterns full,1/4
    # 8 GPUs: the paper's GLM-5 row and DeepSeek-V3.2, whole models with random FP8 weights, 128K and 200K,
    # full DSA vs 1/2 and 1/4 (--layers 16 instead of --fp8-weights: 16 bf16 layers, extrapolated)
    python -m benchmarks.tp --tp 8 --model glm-5 --fp8-weights --contexts 128K,200K --patterns full,1/2,1/4
    python -m benchmarks.tp --tp 8 --model deepseek-v3.2 --fp8-weights --contexts 128K,200K --patterns full,1/2,1/4

``--tp 1,2`` runs ``torchrun --standalone --nproc-per-node N -m benchmarks.tp --rank-run ...`` once per N, then
prints the ratios. CPU smoke run of one rank-run (2 gloo ranks, timings mean nothing):
``torchrun --standalone --nproc-per-node 2 -m benchmarks.tp --rank-run --model tiny --contexts 300 --decode-steps 4``. Every rank runs the same engine on its shard (``load_sharded``'s random form: split weights
drawn per rank, replicated ones broadcast), TTFT and decode are rank 0's wall times (the collectives keep the ranks
in step). ``--layers N`` runs N layers and extrapolates like benchmarks/e2e.py (a full-size model in bf16 does not
fit 8 H200s: 671B / 744B parameters); the same run measures the NCCL all-reduce bus bandwidth and the GPU's matmul
and copy ceilings, and writes tp_<model>.json (and each rank-run's JSON) to $OUT (or runs/benchmarks/).
"""
from __future__ import annotations

if __name__ == "__main__" and "--rank-run" not in __import__("sys").argv:  # refuse at once without a GPU
    from benchmarks.require_gpu import require_gpu

    require_gpu("python -m benchmarks.tp", "torchrun --standalone --nproc-per-node 2 -m benchmarks.tp --rank-run "
                "--model tiny --contexts 300 --decode-steps 4")

import argparse
import json
import os
import subprocess
import sys
import time

import torch


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--tp", default="1,2", help="comma-separated tensor-parallel sizes to compare")
    p.add_argument("--model", default="glm-4.7-flash-dsa")
    p.add_argument("--contexts", default="200K")
    p.add_argument("--patterns", default="full,1/4")
    p.add_argument("--layers", type=int, default=None, help="run only this many layers and extrapolate")
    p.add_argument("--expert-parallel", action="store_true")
    p.add_argument("--fp8-weights", action="store_true",
                   help="FP8 linear/expert weights (128x128 blocks), as DeepSeek-V3.2 / GLM-5 ship: the full-size "
                        "models fit 8 H200s only this way")
    p.add_argument("--decode-steps", type=int, default=32)
    p.add_argument("--chunk", type=int, default=16384, help="prefill chunk (tokens per step)")
    p.add_argument("--kv-cache-dtype", default="bf16", choices=["bf16", "fp8"])
    p.add_argument("--indexer-cache", default="auto", choices=["auto", "exact", "fp8"])
    p.add_argument("--workspace-gb", type=int, default=4)
    p.add_argument("--no-compile", action="store_true", help="decode glue not torch.compile'd")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--name", default=None)
    p.add_argument("--rank-run", action="store_true", help=argparse.SUPPRESS)  # one torchrun job (internal)
    return p


def allreduce_busbw_gbps(ctx, mib: int = 64) -> float:
    """NCCL all-reduce bus bandwidth (nccl-tests' definition: 2(N-1)/N x bytes / time), bf16."""
    import torch.distributed as dist

    x = torch.randn(mib << 19, device=ctx.device, dtype=torch.bfloat16)
    for _ in range(3):
        dist.all_reduce(x)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    reps = 10
    for _ in range(reps):
        dist.all_reduce(x)
    torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / reps
    n = ctx.world_size
    return (mib << 20) * 2 * (n - 1) / n / dt / 1e9


def rank_run(args) -> int:
    from benchmarks.common import measure_ceilings, run_metadata, write_results
    from benchmarks.e2e import breakdown_total, parse_ctx, scale_factors, sub_pattern, timed_prefill_decode
    from indexcache.distributed import init_distributed, random_shard, use_fp8_shard_storage
    from indexcache.presets import preset_config

    ctx = init_distributed(expert_parallel=args.expert_parallel)
    n = ctx.world_size
    cfg_full = preset_config(args.model)
    cfg = cfg_full.replace(num_layers=args.layers) if args.layers else cfg_full
    meta = run_metadata()
    cuda = ctx.device.type == "cuda"  # on CPU: a smoke run of the code path (--model tiny), timings mean nothing
    ceilings = measure_ceilings(str(ctx.device)) if ctx.rank == 0 and cuda else {}
    if n > 1 and cuda:
        ceilings["allreduce_busbw_gbps_64mib"] = allreduce_busbw_gbps(ctx)
    t0 = time.perf_counter()
    if args.fp8_weights and not args.layers:  # draw and quantise layer by layer: bf16 weights would not fit
        model = _fp8_random_shard(cfg, ctx, args.seed)
    else:
        model = random_shard(cfg, ctx, torch.bfloat16 if cuda else torch.float32, args.seed)
        if args.fp8_weights:
            use_fp8_shard_storage(model, quantize=True)
            torch.cuda.empty_cache()
    weight_gib = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers())) / 2**30
    if ctx.rank == 0:
        print(f"TP {n}{' EP' if args.expert_parallel else ''}: {args.model} {cfg.num_layers}/{cfg_full.num_layers} "
              f"layers, {weight_gib:.1f} GiB of weights per rank, built in {time.perf_counter() - t0:.0f}s; "
              f"ceilings {ceilings}", flush=True)
    rows = []
    for c in [parse_ctx(x) for x in args.contexts.split(",")]:
        for pat in [x.strip() for x in args.patterns.split(",")]:
            sub = sub_pattern(pat, cfg.num_layers)
            warm = argparse.Namespace(**{**vars(args), "decode_steps": 3})
            timed_prefill_decode(model, sub, min(c, 16384), warm, cfg.vocab_size)  # compile / autotune first
            if cuda:
                torch.cuda.empty_cache()
            r = {"tp": n, "context": c, "pattern": pat}
            r.update(timed_prefill_decode(model, sub, c, args, cfg.vocab_size))
            scale = scale_factors(pat, cfg.num_layers, cfg_full.num_layers)
            r["est_ttft_s"] = breakdown_total(r["prefill_breakdown_ms"], scale) / 1e3
            dec = r["decode_breakdown_ms"]
            ratio = breakdown_total(dec, scale) / max(breakdown_total(dec), 1e-9) if dec else None
            r["est_decode_tok_s"] = r["decode_tok_s"] / ratio if ratio else None
            rows.append(r)
            if ctx.rank == 0:
                print(f"TP {n} ctx {c:>7} {pat:<5} TTFT {r['ttft_s']:.3f}s (est {r['est_ttft_s']:.2f}s)  decode "
                      f"{r['decode_tok_s']:.1f} tok/s (est {r['est_decode_tok_s'] or 0:.1f})", flush=True)
    if ctx.rank == 0:
        write_results(args.name or f"tp{n}_{args.model}", {"meta": meta, "ceilings": ceilings, "args": vars(args),
                                                           "weight_gib_per_rank": weight_gib, "rows": rows})
    return 0


def _fp8_random_shard(cfg, ctx, seed):
    """A full-size random FP8 shard without ever holding its bf16 weights: the first layers up to the first MoE
    layer are drawn and quantised, the remaining layers are copies of the last one (speed does not depend on the
    values; replicated weights stay equal on every rank)."""
    import copy

    from indexcache.distributed import random_shard, use_fp8_shard_storage

    first = cfg.mlp_layer_types.index("sparse") + 1 if "sparse" in cfg.mlp_layer_types else 1
    model = use_fp8_shard_storage(random_shard(cfg.replace(num_layers=first), ctx, torch.bfloat16, seed),
                                  quantize=True)
    for _ in range(first, cfg.num_layers):
        model.layers.append(copy.deepcopy(model.layers[-1]))
    model.config = cfg
    torch.cuda.empty_cache()
    return model


def main(argv=None) -> int:
    args = add_arguments(argparse.ArgumentParser(prog="python -m benchmarks.tp")).parse_args(argv)
    if args.rank_run:
        return rank_run(args)
    from benchmarks.common import results_dir, table, write_results

    sizes = [int(x) for x in args.tp.split(",")]
    if torch.cuda.device_count() < max(sizes):
        print(f"error: --tp {args.tp} needs {max(sizes)} GPUs, {torch.cuda.device_count()} visible", file=sys.stderr)
        return 2
    passthrough = [a for a in (argv if argv is not None else sys.argv[1:])]
    results = {}
    for n in sizes:
        name = f"tp{n}_{args.model}"
        cmd = ["torchrun", "--standalone", f"--nproc-per-node={n}", "-m", "benchmarks.tp", *passthrough,
               "--rank-run", "--name", name]
        print("$", " ".join(cmd), flush=True)
        if subprocess.run(cmd, check=False).returncode:
            print(f"error: the TP {n} run failed", file=sys.stderr)
            return 1
        with open(os.path.join(results_dir(), f"{name}.json")) as f:
            results[n] = json.load(f)
    base = {(r["context"], r["pattern"]): r for r in results[sizes[0]]["rows"]}
    rows = []
    for n in sizes:
        for r in results[n]["rows"]:
            b = base[(r["context"], r["pattern"])]
            rows.append({**{k: r[k] for k in ("tp", "context", "pattern", "ttft_s", "est_ttft_s", "decode_tok_s",
                                                "est_decode_tok_s")},
                         f"ttft_vs_tp{sizes[0]}": r["ttft_s"] / b["ttft_s"],
                         f"decode_vs_tp{sizes[0]}": r["decode_tok_s"] / b["decode_tok_s"]})
    write_results(f"tp_{args.model}", {"sizes": sizes, "runs": results, "rows": rows,
                                       "target": "TTFT at TP 2 <= 0.6 x TP 1 at 200K (issue 11)"})
    print(table(rows, list(rows[0])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
