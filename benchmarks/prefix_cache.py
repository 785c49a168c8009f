"""Automatic prefix caching on the GPU: TTFT of a long document, then of a new question about the same document.

    python -m benchmarks.prefix_cache                      # glm-4.7-flash-dsa, all 47 layers, 200K document
    python -m benchmarks.prefix_cache --layers 8           # fewer layers (both TTFTs shrink about alike)
    python -m benchmarks.prefix_cache --device cpu --model tiny --document 2000 --question 50 --check-context 300
                                                            # a CPU smoke run (timings mean nothing)

Weights are random bf16, prompts are random token ids. Request 1 is the document plus a question (cold cache);
request 2 is the same document plus a new question of ``--question`` tokens: only the question (and the document's
last partial page) is computed. Target: TTFT 2 <= 0.05 x TTFT 1. A short check first compares the logits of a
cached-prefix request with the same request computed without the cache (``enable_prefix_caching=False``).
"""
from __future__ import annotations

import argparse
import time

import torch

from benchmarks.common import measure_ceilings, run_metadata, table, write_results
from indexcache.checkpoint import build_empty
from indexcache.engine import EngineConfig, LLMEngine
from indexcache.presets import preset_config
from indexcache.sampling import SamplingParams

TARGET = 0.05


def tokens(n: int, seed: int, vocab: int) -> list[int]:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def engine(model, args, max_len: int, num_seqs: int, caching: bool = True) -> LLMEngine:
    cfg = EngineConfig(max_model_len=max_len, max_num_seqs=2, max_prefill_tokens=args.chunk,
                       num_kv_blocks=num_seqs * (-(-max_len // 64)) + 1, kv_cache_dtype=args.kv_cache_dtype,
                       workspace_bytes=args.workspace_gb << 30, enable_prefix_caching=caching)
    return LLMEngine(model, cfg, index_pattern=args.pattern)


def ttft(eng: LLMEngine, prompt: list[int]) -> tuple[float, int, torch.Tensor]:
    """Seconds to the first token, tokens computed, and that token's logits."""
    captured = {}
    orig = eng._sample

    def keep(logits, seqs, rows):
        captured["logits"] = logits[rows[0]].float().clone()
        return orig(logits, seqs, rows)

    eng._sample = keep
    before = eng.num_computed_tokens
    if eng.device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    seq = eng.add_request(prompt, SamplingParams(max_tokens=1, temperature=0, ignore_eos=True))
    while seq.first_token_time is None:
        eng.step()
    dt = time.perf_counter() - t0  # the step's token sync already waited for the GPU
    eng._sample = orig
    while eng.has_unfinished():
        eng.step()
    return dt, eng.num_computed_tokens - before, captured["logits"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="glm-4.7-flash-dsa")
    p.add_argument("--layers", type=int, default=None, help="build only this many layers (default: all)")
    p.add_argument("--pattern", default=None, help="F/S string, 1/N or all (default: the preset's, full DSA)")
    p.add_argument("--document", type=int, default=200_000, help="document tokens")
    p.add_argument("--question", type=int, default=200, help="question tokens")
    p.add_argument("--check-context", type=int, default=16384,
                   help="document tokens of the correctness check (also the kernels' warm-up)")
    p.add_argument("--chunk", type=int, default=16384, help="prefill chunk (tokens per step)")
    p.add_argument("--kv-cache-dtype", default="bf16", choices=["bf16", "fp8"])
    p.add_argument("--workspace-gb", type=int, default=4)
    p.add_argument("--name", default="prefix_cache")
    p.add_argument("--device", default="cuda", help="cuda, or cpu for a smoke run")
    args = p.parse_args(argv)
    dev = args.device
    if dev == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU: this benchmark times the GPU (--device cpu for a smoke run)")
    cfg = preset_config(args.model)
    n_layers = cfg.num_layers
    if args.layers:
        cfg = cfg.replace(num_layers=args.layers)
    meta, ceilings = run_metadata(), (measure_ceilings() if dev == "cuda" else {})
    print(f"{meta['device']}  torch {meta['torch']}  triton {meta['triton']}  ceilings {ceilings}", flush=True)
    t = time.perf_counter()
    model = build_empty(cfg, dev, torch.bfloat16 if dev == "cuda" else torch.float32).init_random(0).eval()
    print(f"{args.model}: {cfg.num_layers}/{n_layers} layers built in {time.perf_counter() - t:.0f} s", flush=True)
    V, q = cfg.vocab_size, args.question

    # correctness at a short context (also compiles the kernels of both paths): cached prefix vs no cache
    doc = tokens(args.check_context, 1, V)
    check = engine(model, args, args.check_context + 2 * q + 64, 2)
    ttft(check, doc + tokens(q, 2, V))
    _, computed, cached_logits = ttft(check, doc + tokens(q, 3, V))
    plain = engine(model, args, args.check_context + 2 * q + 64, 1, caching=False)
    _, _, plain_logits = ttft(plain, doc + tokens(q, 3, V))
    diff = (cached_logits - plain_logits).abs().max().item()
    same_top = int(cached_logits.argmax()) == int(plain_logits.argmax())
    print(f"check at {args.check_context} tokens: computed {computed} of {args.check_context + q}, max |logit diff| "
          f"{diff:.3g}, same greedy token {same_top}", flush=True)
    del check, plain
    if dev == "cuda":
        torch.cuda.empty_cache()

    doc = tokens(args.document, 4, V)
    eng = engine(model, args, args.document + 2 * q + 64, 2)
    print(f"request 1: {args.document} + {q} tokens, cold cache ...", flush=True)
    t1, c1, _ = ttft(eng, doc + tokens(q, 5, V))
    print(f"  TTFT {t1:.2f} s; request 2: the same document + a new question ...", flush=True)
    t2, c2, _ = ttft(eng, doc + tokens(q, 6, V))
    ratio = t2 / t1
    rows = [{"request": "document + question 1 (cold)", "prompt_tokens": args.document + q, "computed": c1,
             "ttft_s": t1},
            {"request": "document + question 2 (cached)", "prompt_tokens": args.document + q, "computed": c2,
             "ttft_s": t2}]
    payload = {**meta, "ceilings": ceilings, "model": args.model, "layers_run": cfg.num_layers,
               "layers_model": n_layers, "pattern": str(eng.pattern), "kv_cache_dtype": args.kv_cache_dtype,
               "indexer_cache": eng.kv.indexer_format, "chunk": args.chunk, "rows": rows, "ttft_ratio": ratio,
               "target_ratio": TARGET, "target_met": ratio <= TARGET,
               "check": {"context": args.check_context, "max_abs_logit_diff": diff, "same_greedy_token": same_top}}
    print(f"wrote {write_results(args.name, payload, out_dirs=None if dev == 'cuda' else ['/tmp'])}")
    print(f"\nprefix cache, {args.model} ({cfg.num_layers}/{n_layers} layers, pattern {eng.pattern}), "
          f"{args.document} + {q} tokens")
    print(table(rows, ["request", "prompt_tokens", "computed", "ttft_s"]))
    print(f"TTFT ratio {ratio:.4f} (target <= {TARGET}: {'met' if ratio <= TARGET else 'NOT met'})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
