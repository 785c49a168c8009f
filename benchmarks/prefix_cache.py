"""Automatic prefix caching on the GPU: TTFT of a long document, then of a new question about the same document.

    python -m benchmarks.prefix_cache                      # glm-4.7-flash-dsa, all 47 layers, 200K document
    python -m benchmarks.prefix_cache --layers 8           # fewer layers (both TTFTs shrink about alike)
    python -m benchmarks.prefix_cache --device cpu --model tiny --document 2000 --question 50 --check-context 320
                                                            # a CPU smoke run (timings mean nothing)

Weights are random bf16, prompts are random token ids. Request 1 is the document plus a question (cold cache);
request 2 is the same document plus a new question of ``--question`` tokens: only the question (and the document's
last partial page) is computed. Target: TTFT 2 <= 0.05 x TTFT 1.

A check first compares the first-token logits of a cached-prefix request with the same request computed without
the cache (``enable_prefix_caching=False``), the uncached run's prefill chunk ending exactly where the cached prefix
ends. Controls say what a difference means: the same uncached run again (run-to-run noise) and with another
chunking, each also under ``torch.use_deterministic_algorithms``, where a correct cache gives exactly equal logits
(``correctness_check``). The table reports the reference's scale too: its largest |logit| and its top-1 gap.
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


def engine(model, args, max_len: int, num_seqs: int, caching: bool = True, chunk: int | None = None) -> LLMEngine:
    cfg = EngineConfig(max_model_len=max_len, max_num_seqs=2, max_prefill_tokens=chunk or args.chunk,
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


CHECK_COLS = ["mode", "run", "chunk", "computed", "max_abs_diff", "mean_abs_diff", "max_abs_logit", "top1_gap",
              "same_greedy"]


def first_logits(model, args, prompts: list[list[int]], chunk: int, caching: bool) -> tuple[torch.Tensor, int]:
    """The first-token logits of the last prompt (the earlier ones run before it, to fill the prefix cache) on a
    fresh engine with prefill chunks of ``chunk`` tokens, and the tokens that request computed."""
    eng = engine(model, args, max(len(p) for p in prompts) + 64, len(prompts), caching=caching, chunk=chunk)
    for p in prompts:
        _, computed, logits = ttft(eng, p)
    del eng
    return logits, computed


def compare(ref: torch.Tensor, other: torch.Tensor) -> dict:
    """Difference of two logit vectors, with the reference's scale: its largest |logit| and its top-1 - top-2 gap
    (a difference above the gap can change the greedy token)."""
    top2 = ref.topk(2).values
    d = (other - ref).abs()
    return {"max_abs_diff": d.max().item(), "mean_abs_diff": d.mean().item(), "max_abs_logit": ref.abs().max().item(),
            "top1_gap": (top2[0] - top2[1]).item(), "same_greedy": int(ref.argmax()) == int(other.argmax())}


def correctness_check(model, args, V: int) -> tuple[dict, list[dict]]:
    """Cached-prefix first-token logits against uncached ones, with controls that say what a difference means.

    The prompt is a document of ``--check-context`` tokens (a whole number of pages) plus a question. Uncached runs
    use prefill chunks of ``--check-context`` tokens, so a chunk ends exactly where the cached prefix ends: the
    question's tokens are then computed from the same inputs in both runs, and the logits should agree to the
    run-to-run noise. Controls: the same uncached run again (run-to-run noise: atomics, e.g. the MoE's bf16
    index_add_), and with chunks of ``--check-chunk`` tokens (chunking noise). Each is run twice: as the engine
    runs, and under ``torch.use_deterministic_algorithms`` (warn_only), where a correct cache gives exactly equal
    logits."""
    q = args.question
    doc = tokens(args.check_context, 1, V)
    warm, prompt = doc + tokens(q, 2, V), doc + tokens(q, 3, V)
    c_al, c_other = args.check_context, args.check_chunk
    rows, out = [], {"context": args.check_context, "question": q, "layers": model.config.num_layers,
                     "aligned_chunk": c_al, "other_chunk": c_other}
    fill = torch.utils.deterministic.fill_uninitialized_memory
    for mode in ("default", "deterministic"):
        det = mode == "deterministic"
        torch.use_deterministic_algorithms(det, warn_only=True)
        torch.utils.deterministic.fill_uninitialized_memory = False  # determinism only, not NaN-filled buffers
        try:
            ref, _ = first_logits(model, args, [prompt], c_al, caching=False)
            runs = [("uncached again", c_al, *first_logits(model, args, [prompt], c_al, caching=False)),
                    ("uncached, other chunking", c_other, *first_logits(model, args, [prompt], c_other, caching=False)),
                    ("cached prefix (aligned)", c_al, *first_logits(model, args, [warm, prompt], c_al, caching=True))]
        finally:
            torch.use_deterministic_algorithms(False)
            torch.utils.deterministic.fill_uninitialized_memory = fill
        for name, chunk, logits, computed in runs:
            rows.append({"mode": mode, "run": name, "chunk": chunk, "computed": computed, **compare(ref, logits)})
        print(f"check ({mode}): " + "; ".join(f"{r['run']}: max |diff| {r['max_abs_diff']:.3g}, same greedy "
                                             f"{r['same_greedy']}" for r in rows[-3:]), flush=True)
    by = {(r["mode"], r["run"]): r for r in rows}
    cached, floor = by["default", "cached prefix (aligned)"], by["default", "uncached again"]
    det_cached, det_floor = by["deterministic", "cached prefix (aligned)"], by["deterministic", "uncached again"]
    if det_floor["max_abs_diff"] == 0 and det_cached["max_abs_diff"] > 0:
        verdict = ("BUG: deterministic uncached runs agree exactly but the cached prefix does not "
                   f"(max |diff| {det_cached['max_abs_diff']:.3g})")
    elif det_floor["max_abs_diff"] == 0:
        verdict = ("no bug: under deterministic algorithms the cached prefix gives exactly the uncached logits; the "
                   f"default-mode difference ({cached['max_abs_diff']:.3g}) is run-to-run noise (uncached vs uncached "
                   f"{floor['max_abs_diff']:.3g})")
    else:
        ok = det_cached["max_abs_diff"] <= 2 * det_floor["max_abs_diff"]
        verdict = (f"{'no sign of a bug' if ok else 'SUSPECT'}: deterministic mode leaves run-to-run noise "
                   f"{det_floor['max_abs_diff']:.3g}; cached prefix {det_cached['max_abs_diff']:.3g}")
    out.update({"rows": rows, "verdict": verdict, "max_abs_logit_diff": cached["max_abs_diff"],
                "same_greedy_token": cached["same_greedy"], "computed": cached["computed"]})
    return out, rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="glm-4.7-flash-dsa")
    p.add_argument("--layers", type=int, default=None, help="build only this many layers (default: all)")
    p.add_argument("--pattern", default=None, help="F/S string, 1/N or all (default: the preset's, full DSA)")
    p.add_argument("--document", type=int, default=200_000, help="document tokens")
    p.add_argument("--question", type=int, default=200, help="question tokens")
    p.add_argument("--check-context", type=int, default=16384,
                   help="document tokens of the correctness check (also the kernels' warm-up; a multiple of 64)")
    p.add_argument("--check-chunk", type=int, default=None,
                   help="prefill chunk of the check's chunking control (default: check-context // 3 + 1)")
    p.add_argument("--chunk", type=int, default=16384, help="prefill chunk (tokens per step)")
    p.add_argument("--kv-cache-dtype", default="bf16", choices=["bf16", "fp8"])
    p.add_argument("--workspace-gb", type=int, default=4)
    p.add_argument("--name", default="prefix_cache")
    p.add_argument("--device", default="cuda", help="cuda, or cpu for a smoke run")
    args = p.parse_args(argv)
    if args.check_context < 64 or args.check_context % 64:
        raise SystemExit(f"--check-context must be a positive multiple of the page size 64 (the cached prefix ends "
                         f"at a page boundary), got {args.check_context}")
    args.check_chunk = args.check_chunk or args.check_context // 3 + 1
    if args.check_chunk < 1 or args.check_chunk == args.check_context:
        raise SystemExit(f"--check-chunk must be positive and differ from --check-context, got {args.check_chunk}")
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

    check, check_rows = correctness_check(model, args, V)
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
               "check": check}
    print(f"wrote {write_results(args.name, payload, out_dirs=None if dev == 'cuda' else ['/tmp'])}")
    print(f"\nprefix cache, {args.model} ({cfg.num_layers}/{n_layers} layers, pattern {eng.pattern}), "
          f"{args.document} + {q} tokens")
    print(table(rows, ["request", "prompt_tokens", "computed", "ttft_s"]))
    print(f"\ncorrectness check: first-token logits at {args.check_context} + {q} tokens "
          f"({check['layers']} layers), each row against the uncached run with chunk {check['aligned_chunk']}")
    print(table(check_rows, CHECK_COLS))
    print(f"verdict: {check['verdict']}")
    print(f"TTFT ratio {ratio:.4f} (target <= {TARGET}: {'met' if ratio <= TARGET else 'NOT met'})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
