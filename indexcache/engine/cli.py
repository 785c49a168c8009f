"""``indexcache generate`` and ``indexcache bench``; cli.py wires them in with ``register(subparsers)``."""
from __future__ import annotations

import json


def _cmd_generate(args) -> int:
    from ..llm import LLM

    with LLM(args.model, args.pattern, max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
             kv_cache_dtype=args.kv_cache_dtype, enforce_eager=args.enforce_eager, seed=args.seed,
             weight_dtype=args.weight_dtype, tensor_parallel_size=args.tensor_parallel_size,
             enable_expert_parallel=args.enable_expert_parallel) as llm:
        return _generate(llm, args)


def _generate(llm, args) -> int:
    from ..sampling import SamplingParams

    prompts = [[int(t) for t in p.split(",")] if args.token_ids else p for p in args.prompt]
    sp = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                        top_k=args.top_k, seed=args.seed, ignore_eos=args.ignore_eos)
    bpt = llm.cache_bytes_per_token()
    print(f"pattern {llm.pattern} ({bpt['num_full_layers']} full layers); KV cache {bpt['total']} B/token "
          f"({bpt['saving_vs_full_dsa']:.1%} less than full DSA)")
    for out in llm.generate(prompts, sp):
        o = out.outputs[0]
        print(json.dumps({"prompt": out.prompt, "text": o.text, "token_ids": o.token_ids,
                          "finish_reason": o.finish_reason, "ttft_s": out.metrics.get("ttft_s")}))
    return 0


def _cmd_bench(args) -> int:
    from benchmarks.e2e import main as bench_main

    return bench_main(args=args)


def register(subparsers) -> None:
    g = subparsers.add_parser("generate", help="generate with the IndexCache engine (presets take token ids)")
    g.add_argument("model", help="checkpoint folder or preset name")
    g.add_argument("prompt", nargs="+", help="prompts (with --token-ids: comma-separated token ids)")
    g.add_argument("--pattern", default=None, help="F/S string, 1/N or all (default: the checkpoint's)")
    g.add_argument("--token-ids", action="store_true")
    g.add_argument("--max-tokens", type=int, default=32)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--ignore-eos", action="store_true")
    g.add_argument("--max-model-len", type=int, default=8192)
    g.add_argument("--max-num-seqs", type=int, default=16)
    g.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32", "fp8"])
    g.add_argument("--enforce-eager", action="store_true")
    g.add_argument("-tp", "--tensor-parallel-size", type=int, default=1,
                   help="worker processes to shard the model over (one per GPU; gloo ranks on CPU)")
    g.add_argument("--enable-expert-parallel", action="store_true",
                   help="split routed experts by expert instead of by intermediate dim")
    g.add_argument("--weight-dtype", default="auto", choices=["auto", "fp8", "bf16"],
                   help="FP8 (128x128 block scales) or bf16 linear/expert weights; auto keeps FP8 checkpoints FP8 "
                        "on a GPU with the block-scaled FP8 GEMM (Hopper)")
    g.set_defaults(func=_cmd_generate)
    b = subparsers.add_parser("bench", help="end-to-end TTFT/decode benchmark on a GPU (benchmarks/e2e.py)")
    try:  # the benchmark lives in the repository's benchmarks/ folder (run from the repo root)
        from benchmarks.e2e import add_arguments
    except ImportError:
        b.set_defaults(func=lambda a: print("error: run `indexcache bench` from the repository root "
                                            "(benchmarks/ is not installed)") or 2)
        return
    add_arguments(b)
    b.set_defaults(func=_cmd_bench)
