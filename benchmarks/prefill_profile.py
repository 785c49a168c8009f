"""Where prefill time goes: per-kernel GPU time of the prefill chunk that ends a long prompt (its queries attend to
the whole context), over a random-filled cache (no earlier prefill), eager as the engine runs prefill.

    python -m benchmarks.prefill_profile --model glm-4.7-flash-dsa --layers 0 --weight-dtype fp8 --context 200K \
        --patterns 1/4,full          # the whole model; about 1 min per pattern on an H200

Prints, per pattern: the chunk's wall time and the kernels sorted by GPU time (torch.profiler / CUPTI), then the
time per kernel family (indexer, top-k, sparse MLA, MoE experts, GEMMs, ...), which is what the prefill kernels'
targets are about. Everything goes to ``prefill_profile.json`` ($OUT, else runs/benchmarks). ``--layers 0`` runs
the whole model; fewer layers keep the first ones. ``--ops N`` also lists the N costliest aten ops with their input
shapes (which torch op launches each elementwise or copy kernel).
"""
from __future__ import annotations

if __name__ == "__main__":  # without a GPU, refuse before the seconds-long torch import
    from benchmarks.require_gpu import require_gpu

    require_gpu("python -m benchmarks.prefill_profile", "python -m benchmarks.prefill_profile --device cpu --model "
                "tiny --layers 2 --context 512 --chunk 128 --patterns full")

import argparse
import re
import time

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.common import run_metadata, table, write_results
from benchmarks.decode_profile import build_model, profile_step
from benchmarks.e2e import add_arguments, fill_random, make_engine, parse_ctx, sync
from indexcache.sampling import SamplingParams

# kernel name -> family, first match wins (Triton kernels keep their Python names; cuBLAS/CUTLASS GEMMs do not)
FAMILIES = [("indexer", r"indexer|_logits|_fused_topk|candidate"), ("topk", r"topk|_hist|_filter|_select"),
            ("sparse_mla", r"sparse_mla|_attend|fp8_gather"), ("moe_experts", r"grouped_fp8|swiglu|_plan_|moe"),
            ("act_quant", r"act_quant"), ("gemm", r"gemm|nvjet|cutlass|sm90|xmma|cublas|scaled_mm"),
            ("kv_store", r"kv_store|_store_"), ("norm_rope", r"norm|rope"), ("copy_elementwise", r".")]


def family(kernel: str) -> str:
    for name, pattern in FAMILIES:
        if re.search(pattern, kernel, re.IGNORECASE):
            return name
    return "other"


def op_table(fn, steps: int, cuda: bool) -> list[dict]:
    """The aten ops of ``fn`` grouped by (name, input shapes), by self GPU time per step (on CUDA) or self CPU time:
    which torch op (and on which tensor) launches each elementwise / copy kernel of the kernel table."""
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts, record_shapes=True) as prof:
        for _ in range(steps):
            fn()
        sync()
    rows = []
    for e in prof.key_averages(group_by_input_shape=True):
        if not e.key.startswith("aten::"):
            continue
        t = (getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)) if cuda \
            else e.self_cpu_time_total
        if t > 0:
            rows.append({"op": e.key, "shapes": str(e.input_shapes)[:160], "us_per_step": t / steps,
                         "calls_per_step": e.count / steps})
    rows.sort(key=lambda r: -r["us_per_step"])
    return rows


def last_chunk_batch(model, pattern, ctx, args):
    """An engine whose one sequence has its first ``ctx - chunk`` tokens in a random-filled cache, and the runner
    batch that prefills the last ``chunk`` tokens."""
    eng = make_engine(model, pattern, ctx, args)
    fill_random(eng.kv)
    chunk = min(args.chunk, ctx)
    seq = eng.add_request(torch.randint(1, model.config.vocab_size, (ctx,)).tolist(),
                          SamplingParams(max_tokens=1, temperature=0, ignore_eos=True))
    eng.scheduler.waiting.remove(seq)
    eng.blocks.grow(seq, ctx)
    return eng, eng.runner.prepare([(seq.token_ids, ctx - chunk, chunk, seq.table_array())]), chunk


def main(argv=None) -> int:
    p = add_arguments(argparse.ArgumentParser(description=__doc__.split("\n")[0]))
    p.add_argument("--context", default="200K")
    p.add_argument("--steps", type=int, default=2, help="chunks profiled (after one warm-up)")
    p.add_argument("--top", type=int, default=30, help="kernels printed per pattern")
    p.add_argument("--ops", type=int, default=0,
                   help="also print (and save) this many aten ops with their input shapes (record_shapes), by self "
                        "GPU time (CPU time on --device cpu)")
    p.set_defaults(layers=4, patterns="full,1/4", name="prefill_profile")
    args = p.parse_args(argv)
    dev = args.device
    ctx = parse_ctx(args.context)
    cfg, model = build_model(args)
    res = {"meta": run_metadata(), "args": vars(args), "cases": []}
    for pat in args.patterns.split(","):
        eng, batch, chunk = last_chunk_batch(model, pat, ctx, args)
        run = eng.runner.forward
        with torch.inference_mode():
            run(batch)  # warm-up: Triton compiles
            sync()
            t0 = time.perf_counter()
            for _ in range(args.steps):
                run(batch)
            sync()
            chunk_ms = (time.perf_counter() - t0) / args.steps * 1e3
            case = {"pattern": pat, "context": ctx, "chunk": chunk, "layers": cfg.num_layers,
                    "weight_dtype": args.weight_dtype, "chunk_ms": chunk_ms}
            if dev == "cuda":
                kernels, total = profile_step(lambda: run(batch), args.steps)
                fams: dict[str, float] = {}
                for r in kernels:
                    r["family"] = family(r["kernel"])
                    fams[r["family"]] = fams.get(r["family"], 0.0) + r["us_per_step"] / 1e3
                case.update(kernel_ms=total / 1e3, families_ms=dict(sorted(fams.items(), key=lambda kv: -kv[1])),
                            kernels=kernels[:args.top])
            if args.ops:
                case["ops"] = op_table(lambda: run(batch), args.steps, dev == "cuda")[:args.ops]
        res["cases"].append(case)
        print(f"\n== {pat}: the last {chunk}-token chunk of a {ctx}-token prompt, {cfg.num_layers} layers: "
              f"{chunk_ms:.1f} ms wall" + (f", {case['kernel_ms']:.1f} ms in kernels" if "kernel_ms" in case else ""))
        for name, ms in case.get("families_ms", {}).items():
            print(f"  {ms:9.2f} ms  {name}")
        for r in case.get("kernels", []):
            print(f"  {r['us_per_step'] / 1e3:9.3f} ms  x{r['calls_per_step']:6.1f}  [{r['family']}] {r['kernel']}")
        if case.get("ops"):
            print("  aten ops (self " + ("GPU" if dev == "cuda" else "CPU") + " time), input shapes:")
        for r in case.get("ops", []):
            print(f"  {r['us_per_step'] / 1e3:9.3f} ms  x{r['calls_per_step']:6.1f}  {r['op']}  {r['shapes']}")
        del eng, batch
        if dev == "cuda":
            torch.cuda.empty_cache()
    for path in write_results(args.name, res):
        print("wrote", path)
    print(table(res["cases"], ["pattern", "context", "chunk", "layers", "chunk_ms", "kernel_ms"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
