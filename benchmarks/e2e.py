"""End-to-end IndexCache benchmark (issue 5): TTFT, single-request decode, full-cache decode, cache bytes per
token and a time breakdown, for full DSA and IndexCache patterns at long contexts, plus a dense-SDPA prefill.

    python -m benchmarks.e2e --quick                        # a few minutes of GPU time
    python -m benchmarks.e2e --contexts 10K,60K,120K,200K   # the paper's Table 1 grid
    python -m benchmarks.e2e --layers 8                     # run 8 layers, extrapolate to the model's 47
    python -m benchmarks.e2e --device cpu --model tiny --quick   # CPU smoke run: seconds, timings mean nothing

Results go to $OUT when set, else to runs/benchmarks/ under the current directory (``--out`` overrides).

Weights are random bf16 (the paper's 30B shape, ``glm-4.7-flash-dsa``), or with ``--weight-dtype fp8`` the same
random weights quantised per 128x128 block and kept in FP8 (model/linear.py says which). With ``--layers N`` only N layers run; the
full-model estimate scales indexer+top-k time by the number of Full layers of the pattern on the whole model and
everything else by the layer count (reported beside the measured numbers, marked ``est_``). The full-cache decode
fills the KV cache with random values instead of prefilling every sequence (decode cost does not depend on the
values), with the batch that fits the full model's KV cache next to its weights.
"""
from __future__ import annotations

if __name__ == "__main__":  # without a GPU, refuse before the seconds-long torch import
    from benchmarks.require_gpu import require_gpu

    require_gpu("python -m benchmarks.e2e", "python -m benchmarks.e2e --device cpu --model tiny --quick")

import argparse
import math
import sys
import time

import torch
import torch.nn.functional as F

from benchmarks.common import measure_ceilings, results_dir, run_metadata, table, write_results
from indexcache.checkpoint import build_empty
from indexcache.engine import EngineConfig, LLMEngine
from indexcache.engine.kv_cache import bytes_per_token
from indexcache.engine.timer import Timer
from indexcache.engine.sequence import Status
from indexcache.model.linear import use_fp8_storage
from indexcache.model.weight_sizes import weight_bytes_per_gpu
from indexcache.pattern import IndexPattern
from indexcache.presets import preset_config
from indexcache.sampling import SamplingParams

PAPER = {  # Table 1 (H100, SGLang): prefill s, decode tok/s per request, full-cache decode tok/s
    "prefill_s": {"full": [0.57, 3.38, 8.57, 19.5], "1/2": [0.47, 2.86, 6.57, 13.7], "1/4": [0.45, 2.59, 5.66, 10.7]},
    "decode_tok_s": {"full": [73.5, 67.0, 63.0, 58.0], "1/2": [84.5, 80.0, 77.0, 73.0], "1/4": [91.0, 89.5, 88.0, 86.0]},
    "decode_full_tok_s": {"full": [2700, 613, 341, 197], "1/2": [3070, 750, 431, 253], "1/4": [3310, 840, 498, 297]},
    "contexts": [10_000, 60_000, 120_000, 200_000],
}


def parse_ctx(s: str) -> int:
    s = s.strip().upper()
    mult = {"K": 1000, "M": 1_000_000}.get(s[-1], 1)
    return int(float(s[:-1] if s[-1] in "KM" else s) * mult)


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def fill_random(kv, seed=0):
    """Random cache contents (valid FP8 bytes where the format is FP8) for decode-only timing."""
    g = torch.Generator(device=kv.latent[0].device).manual_seed(seed)
    for t in kv.latent:
        if t.dtype == torch.uint8:  # FlashMLA FP8 rows: random e4m3 c_kv, scale 2^-6, random bf16 k_pe
            rows = t.view(-1, 656)
            for r0 in range(0, rows.shape[0], 1 << 20):
                r = rows[r0:r0 + (1 << 20)]
                r[:, :512] = torch.randn(r.shape[0], 512, device=t.device, generator=g).to(torch.float8_e4m3fn).view(torch.uint8)
                r[:, 512:528] = torch.full((r.shape[0], 4), 2.0 ** -6, device=t.device).view(torch.uint8)
                r[:, 528:] = torch.randn(r.shape[0], 64, device=t.device, generator=g).to(torch.bfloat16).view(torch.uint8)
        else:
            t.normal_(generator=g)
    for t in kv.index:
        if t is None:
            continue
        if t.dtype == torch.uint8:
            t[:, :8192] = torch.randn(t.shape[0], 8192, device=t.device, generator=g).to(torch.float8_e4m3fn).view(torch.uint8)
            t[:, 8192:] = torch.full((t.shape[0], 64), 0.01, device=t.device).view(torch.uint8)
        else:
            t.normal_(generator=g)


def sub_pattern(spec: str, n_sub: int) -> str:
    """An F/S/R string of the whole model (with its "@pool", if any), cut to the layers that run (other specs apply
    to any depth)."""
    body, at, pool = spec.partition("@")
    return (body[:n_sub] if set(body) <= {"F", "S", "R"} and len(body) > n_sub else body) + at + pool


def scale_factors(pattern_spec, n_sub: int, n_full: int) -> dict:
    """Per-section multipliers from a run of n_sub layers to the n_full-layer model. Indexer and top-k time scale
    with the layers that run an indexer (F and R: with R layers this mixes their costs, so prefer runs of the
    whole pattern there)."""
    f_sub = len(IndexPattern.parse(sub_pattern(pattern_spec, n_sub), n_sub).indexer_layers)
    f_full = len(IndexPattern.parse(pattern_spec, n_full).indexer_layers)
    r = n_full / n_sub
    return {"indexer": f_full / f_sub, "topk": f_full / f_sub, "attention": r, "moe": r, "rest": 1.0, "other": r}


def breakdown_total(bd: dict, scale: dict | None = None) -> float:
    return sum(v * (scale or {}).get(k, 1.0) for k, v in bd.items())


def make_engine(model, pattern, ctx, args, max_num_seqs=1, num_blocks=None):
    max_len = ctx + args.decode_steps + 72
    blocks = num_blocks or max_num_seqs * math.ceil(max_len / 64) + 1
    cfg = EngineConfig(max_model_len=max_len, max_num_seqs=max_num_seqs, max_prefill_tokens=args.chunk,
                       num_kv_blocks=blocks, kv_cache_dtype=args.kv_cache_dtype, indexer_cache=args.indexer_cache,
                       workspace_bytes=args.workspace_gb << 30, cuda_graph_max_bs=max(max_num_seqs, 1),
                       compile_decode=False if getattr(args, "no_compile", False) else None,
                       moe_small_batch_kernel=getattr(args, "moe_small_batch_kernel", True),
                       decode_topk_max_rows=getattr(args, "decode_topk_max_rows", EngineConfig.decode_topk_max_rows))
    if getattr(args, "rerank_pool", None) and "R" in pattern and "@" not in pattern:
        pattern = f"{pattern}@{args.rerank_pool}"
    return LLMEngine(model, cfg, index_pattern=pattern)


def timed_prefill_decode(model, pattern, ctx, args, vocab):
    """TTFT with its breakdown, then single-request decode tok/s (CUDA graphs) and a decode breakdown (eager)."""
    eng = make_engine(model, pattern, ctx, args)
    prompt = torch.randint(0, vocab, (ctx,), generator=torch.Generator().manual_seed(ctx)).tolist()
    seq = eng.add_request(prompt, SamplingParams(max_tokens=args.decode_steps + 8, temperature=0, ignore_eos=True))
    eng.runner.timer = Timer(cuda=eng.device.type == "cuda")
    sync()
    t0 = time.perf_counter()
    while seq.first_token_time is None:
        eng.step()
    sync()
    ttft = time.perf_counter() - t0
    pre_bd = eng.runner.timer.summary_ms()
    eng.runner.timer = None
    pre_bd["other"] = ttft * 1e3 - sum(pre_bd.values())
    # decode: warm the graph, then time
    eng.step()
    sync()
    t0 = time.perf_counter()
    n = 0
    while seq.status is not Status.FINISHED and n < args.decode_steps - 1:
        eng.step()
        n += 1
    sync()
    dec_s = (time.perf_counter() - t0) / max(n, 1)
    dec_bd = decode_breakdown(eng, [seq] if seq.status is not Status.FINISHED else [])
    return {"ttft_s": ttft, "prefill_breakdown_ms": pre_bd, "decode_step_ms": dec_s * 1e3,
            "decode_tok_s": 1 / dec_s, "decode_breakdown_ms": dec_bd, "num_full_layers_run": eng.pattern.num_full,
            "num_rerank_layers_run": eng.pattern.num_rerank, "rerank_pool": eng.plan.pool,
            "cache": eng.cache_bytes, "indexer_cache": eng.kv.indexer_format, "latent_cache": eng.kv.latent_format}


def decode_breakdown(eng, seqs, reps=3):
    if not seqs:
        return {}
    # re-run each sequence's last cached token: its slot exists (the next position's page may not yet)
    b = eng.runner.prepare([(s.token_ids, s.num_computed - 1, 1, s.block_table) for s in seqs])
    eng.runner.forward(b)
    eng.runner.timer = Timer(cuda=eng.device.type == "cuda")
    sync()
    t0 = time.perf_counter()
    for _ in range(reps):
        eng.runner.forward(b)
    sync()
    wall = (time.perf_counter() - t0) * 1e3 / reps
    bd = {k: v / reps for k, v in eng.runner.timer.summary_ms().items()}
    eng.runner.timer = None
    bd["other"] = wall - sum(bd.values())
    return bd


def decode_ready_engine(model, pattern, ctx, args, batch, steps=64):
    """An engine holding ``batch`` running sequences at context ``ctx`` over a random-filled cache (no prefill),
    each allowed ``steps`` more tokens."""
    eng = make_engine(model, pattern, ctx, args, max_num_seqs=batch)
    if eng.device.type == "cuda":
        torch.cuda.empty_cache()
    fill_random(eng.kv)
    sp = SamplingParams(max_tokens=steps + 2, temperature=0, ignore_eos=True)
    seqs = []
    for j in range(batch):
        s = eng.add_request([1] * ctx, sp)
        eng.scheduler.waiting.remove(s)
        eng.blocks.grow(s, ctx + 1)
        s.num_computed = ctx
        s.token_ids.append(2)  # as if the prompt had been prefilled and one token sampled
        s.status = Status.RUNNING
        eng.scheduler.running.append(s)
        seqs.append(s)
    return eng, seqs


def full_cache_decode(model, pattern, ctx, args, batch, steps):
    """Decode tok/s with ``batch`` sequences at context ``ctx`` over a random-filled cache (no prefill)."""
    eng, _ = decode_ready_engine(model, pattern, ctx, args, batch, steps)
    eng.step()  # capture + warm
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        eng.step()
    sync()
    dt = (time.perf_counter() - t0) / steps
    return {"batch": batch, "step_ms": dt * 1e3, "tok_s": batch / dt}


@torch.inference_mode()
def dense_prefill_s(model, ctx, vocab):
    """Prefill with dense causal attention (SDPA over decompressed MLA heads), the no-DSA baseline."""
    cfg = model.config
    dev = model.embed_tokens.weight.device
    ids = torch.randint(0, vocab, (ctx,), device=dev)
    sync()
    t0 = time.perf_counter()
    h = model.embed_tokens(ids)[None]
    pos = torch.arange(ctx, device=dev)[None]
    cos, sin = model.rope(pos, h.dtype)
    for layer in model.layers:
        a = layer.self_attn
        x = layer.input_layernorm(h)
        q_nope, q_pe, _, c_kv, k_pe = a.project(x, cos, sin)
        kv = a.kv_b_proj(c_kv).view(1, ctx, cfg.num_heads, -1)
        k_nope, v = kv.split([cfg.qk_nope_head_dim, cfg.v_head_dim], -1)
        q = torch.cat([q_nope, q_pe], -1).transpose(1, 2)
        k = torch.cat([k_nope, k_pe[:, :, None].expand(-1, -1, cfg.num_heads, -1)], -1).transpose(1, 2)
        o = F.scaled_dot_product_attention(q, k, v.transpose(1, 2), is_causal=True, scale=cfg.softmax_scale)
        h = h + a.o_proj(o.transpose(1, 2).flatten(2))
        del q, k, v, kv, o
        x = layer.post_attention_layernorm(h)[0]
        out = torch.empty_like(x)
        for r0 in range(0, ctx, 32768):
            xs = x[r0:r0 + 32768]
            out[r0:r0 + 32768] = layer.mlp(xs)
        h = h + out[None]
    model.head(h[:, -1:])
    sync()
    return time.perf_counter() - t0


def full_model_bytes_per_token(cfg_full, pattern, args) -> int:
    """Cache bytes per token of the whole model with the run's latent format and FP8 indexer keys."""
    return bytes_per_token(cfg_full, IndexPattern.parse(pattern, cfg_full.num_layers),
                           "fp8" if args.kv_cache_dtype == "fp8" else "bf16", "fp8")["total"]


def max_batch(cfg_full, pattern, ctx, args, weight_bytes) -> int:
    if not torch.cuda.is_available():
        return min(args.max_batch, 4)
    free, total = torch.cuda.mem_get_info()
    budget = 0.9 * total - weight_bytes - 2 * (args.workspace_gb << 30) - 4 * 2**30
    bpt = full_model_bytes_per_token(cfg_full, pattern, args)
    return max(1, min(args.max_batch, int(budget // (bpt * (ctx + 64)))))


def cache_pages_available(cfg_full, pattern, args, weight_bytes, page: int = 64) -> int | None:
    """Pages of ``page`` tokens of the whole model's cache that fit beside its weights (max_batch's budget)."""
    if not torch.cuda.is_available():
        return None
    budget = 0.9 * torch.cuda.mem_get_info()[1] - weight_bytes - 2 * (args.workspace_gb << 30) - 4 * 2**30
    return max(0, int(budget // (full_model_bytes_per_token(cfg_full, pattern, args) * page)))


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--model", default="glm-4.7-flash-dsa")
    p.add_argument("--contexts", default="10K,60K,120K,200K")
    p.add_argument("--patterns", default="full,1/2,1/4", help="comma-separated: full, 1/N, or F/S/R strings")
    p.add_argument("--rerank-pool", type=int, help="candidate pool of F layers for R layers (default 4 x top-k; "
                   "a pattern's own '@c', e.g. FRRR...@4096, takes precedence)")
    p.add_argument("--layers", type=int, default=None, help="run only this many layers and extrapolate")
    p.add_argument("--quick", action="store_true", help="--layers 4, contexts 10K,60K, fewer steps")
    p.add_argument("--decode-steps", type=int, default=32)
    p.add_argument("--full-cache-steps", type=int, default=8)
    p.add_argument("--max-batch", type=int, default=256)
    p.add_argument("--chunk", type=int, default=16384, help="prefill chunk (tokens per step)")
    p.add_argument("--kv-cache-dtype", default="bf16", choices=["bf16", "fp8"])
    p.add_argument("--indexer-cache", default="auto", choices=["auto", "exact", "fp8"])
    p.add_argument("--workspace-gb", type=int, default=4)
    p.add_argument("--warmup-context", type=int, default=16384, help="context of the untimed warm-up run per pattern")
    p.add_argument("--no-compile", action="store_true", help="decode glue not torch.compile'd (on by default on CUDA)")
    p.add_argument("--no-dense", action="store_true")
    p.add_argument("--full-cache-only", action="store_true", help="only the full-cache decode (no prefill)")
    p.add_argument("--no-full-cache", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--weight-dtype", default="bf16", choices=["bf16", "fp8"],
                   help="random weights in bf16, or quantised per 128x128 block and kept in FP8")
    p.add_argument("--max-position-embeddings", type=int, default=None,
                   help="override the preset's maximum context (to time contexts beyond it, e.g. 1M)")
    p.add_argument("--name", default="e2e")
    p.add_argument("--out", default=None, help="folder for the JSON and PNG (default: $OUT, else runs/benchmarks)")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                   help="cuda (default), or cpu for an explicit smoke run whose timings mean nothing")
    return p


def main(argv=None, args=None) -> int:
    p = add_arguments(argparse.ArgumentParser(prog="python -m benchmarks.e2e", description=__doc__.split("\n")[0]))
    if args is None:
        args = p.parse_args(argv)
    dev = args.device
    if dev == "cuda" and not torch.cuda.is_available():
        print("error: torch sees no CUDA device. For a CPU smoke run (timings mean nothing): "
              "python -m benchmarks.e2e --device cpu --model tiny --quick", file=sys.stderr)
        return 2
    if args.quick:
        args.layers = args.layers or (4 if dev == "cuda" else 2)
        if args.contexts == p.get_default("contexts"):
            args.contexts = "10K,60K" if dev == "cuda" else "128"
        args.decode_steps, args.full_cache_steps = min(args.decode_steps, 16), min(args.full_cache_steps, 4)
        if dev == "cpu":
            args.decode_steps, args.full_cache_steps = min(args.decode_steps, 3), min(args.full_cache_steps, 1)
            args.patterns = "full,1/2" if args.patterns == p.get_default("patterns") else args.patterns
    if dev == "cpu":
        print("note: a CPU smoke run (timings mean nothing)", flush=True)
    if args.out is None:
        args.out = results_dir()
    contexts = [parse_ctx(c) for c in args.contexts.split(",")]
    patterns = [s.strip() for s in args.patterns.split(",")]
    cfg_full = preset_config(args.model)
    if args.max_position_embeddings:  # e.g. a 1M-token run of a 200K model: RoPE tables extended, weights random
        cfg_full = cfg_full.replace(max_position_embeddings=args.max_position_embeddings)
    too_long = [c for c in contexts if c + args.decode_steps + 72 > cfg_full.max_position_embeddings]
    if too_long:
        print(f"error: context {too_long[0]} (+{args.decode_steps + 72} for decode) exceeds {args.model}'s "
              f"max_position_embeddings ({cfg_full.max_position_embeddings}): shorten --contexts or raise "
              "--max-position-embeddings", file=sys.stderr)
        return 2
    cfg = cfg_full.replace(num_layers=args.layers) if args.layers else cfg_full
    meta = run_metadata()
    ceilings = measure_ceilings() if dev == "cuda" else {}
    print(f"{meta['device']}  torch {meta['torch']}  ceilings {ceilings}", flush=True)
    t_build = time.perf_counter()
    model = build_empty(cfg, dev, torch.bfloat16 if dev == "cuda" else torch.float32).init_random(args.seed).eval()
    if args.weight_dtype == "fp8":
        use_fp8_storage(model, quantize=True)
        if dev == "cuda":
            torch.cuda.empty_cache()  # the bf16 weights' memory back to the driver: the KV cache sizes from it
    # the whole model's weights (exact, from the config), whatever --layers builds
    weight_bytes = weight_bytes_per_gpu(cfg_full, args.weight_dtype == "fp8")["total"]
    print(f"model {args.model}: {cfg.num_layers}/{cfg_full.num_layers} layers built in "
          f"{time.perf_counter() - t_build:.1f}s; {args.weight_dtype} weights, {weight_bytes / 2**30:.1f} GiB for the "
          f"whole model", flush=True)
    warm_args = argparse.Namespace(**{**vars(args), "decode_steps": 3})
    rows = []
    if args.full_cache_only:
        return full_cache_only(model, cfg, cfg_full, contexts, patterns, args, weight_bytes, meta, ceilings)
    for ctx in contexts:
        # compile the kernels (Triton, and torch.compile'd decode glue) first; kernel arguments that vary with the
        # context are not specialised on, so a shorter warm-up covers longer contexts without doubling their cost
        for pat in patterns:
            timed_prefill_decode(model, sub_pattern(pat, cfg.num_layers), min(ctx, args.warmup_context), warm_args,
                                 cfg.vocab_size)
        dense = None
        if not args.no_dense:
            try:
                dense_prefill_s(model, min(ctx, 4096), cfg.vocab_size)  # warm-up
                dense = dense_prefill_s(model, ctx, cfg.vocab_size)
            except torch.OutOfMemoryError:
                dense = None
            torch.cuda.empty_cache()
        for pat in patterns:
            scale = scale_factors(pat, cfg.num_layers, cfg_full.num_layers)
            r = {"context": ctx, "pattern": pat}
            r.update(timed_prefill_decode(model, sub_pattern(pat, cfg.num_layers), ctx, args, cfg.vocab_size))
            pre = r["prefill_breakdown_ms"]
            dec = r["decode_breakdown_ms"]
            r["est_ttft_s"] = breakdown_total(pre, scale) / 1e3
            dec_ratio = breakdown_total(dec, scale) / max(breakdown_total(dec), 1e-9) if dec else None
            r["est_decode_tok_s"] = r["decode_tok_s"] / dec_ratio if dec_ratio else None
            r["est_indexer_share_prefill"] = (pre.get("indexer", 0) * scale["indexer"] + pre.get("topk", 0) * scale["topk"]) / max(breakdown_total(pre, scale), 1e-9)
            r["cache_bytes_per_token_full_model"] = bytes_per_token(
                cfg_full, IndexPattern.parse(pat, cfg_full.num_layers), r["latent_cache"], r["indexer_cache"])["total"]
            r["weight_dtype"], r["weight_bytes_full_model"] = args.weight_dtype, weight_bytes
            r["cache_pages_available_full_model"] = cache_pages_available(cfg_full, pat, args, weight_bytes)
            if dense is not None:
                r["dense_prefill_s"] = dense
                r["est_dense_prefill_s"] = dense * cfg_full.num_layers / cfg.num_layers
            if not args.no_full_cache:
                b = max_batch(cfg_full, pat, ctx, args, weight_bytes)
                try:
                    fc = full_cache_decode(model, sub_pattern(pat, cfg.num_layers), ctx, args, b, args.full_cache_steps)
                    fc["est_tok_s"] = fc["tok_s"] / dec_ratio if dec_ratio else None
                    r["full_cache_decode"] = fc
                except torch.OutOfMemoryError as e:
                    r["full_cache_decode"] = {"batch": b, "error": f"OOM: {e}"[:200]}
                torch.cuda.empty_cache()
            rows.append(r)
            write_results(args.name, {"meta": meta, "ceilings": ceilings, "args": vars(args), "partial": True,
                                      "rows": rows}, [args.out])  # a run cut short by a time limit keeps what it measured
            print(f"ctx {ctx:>7}  {pat:<6} TTFT {r['ttft_s']:.3f}s (est {r['est_ttft_s']:.2f}s)  decode "
                  f"{r['decode_tok_s']:.1f} tok/s (est {r['est_decode_tok_s'] or 0:.1f})  full-cache "
                  f"{r.get('full_cache_decode', {}).get('tok_s', float('nan')):.0f} tok/s  idx share "
                  f"{r['est_indexer_share_prefill']:.2f}  dense {dense}", flush=True)
    _speedups(rows)
    payload = {"meta": meta, "ceilings": ceilings, "args": vars(args), "model": args.model,
               "layers_run": cfg.num_layers, "layers_model": cfg_full.num_layers, "paper_table1_h100": PAPER,
               "notes": ("est_* extrapolate a --layers run to the whole model (indexer/top-k by Full-layer count, "
                         "the rest by layer count); full-cache decode uses a random-filled cache"),
               "rows": rows}
    payload["plot"] = _plot(rows, args.name, args.out)
    for path in write_results(args.name, payload, [args.out]):
        print("wrote", path)
    print(table(rows, ["context", "pattern", "ttft_s", "est_ttft_s", "decode_tok_s", "est_decode_tok_s",
                       "speedup_prefill", "speedup_decode", "est_indexer_share_prefill"]))
    return 0


def full_cache_only(model, cfg, cfg_full, contexts, patterns, args, weight_bytes, meta, ceilings) -> int:
    """Only the full-cache decode (random-filled cache, no prefill), e.g. to compare cache formats."""
    rows = []
    for ctx in contexts:
        for pat in patterns:
            b = max_batch(cfg_full, pat, ctx, args, weight_bytes)
            sub = sub_pattern(pat, cfg.num_layers)
            full_cache_decode(model, sub, ctx, args, min(b, 2), 2)  # compile / capture warm-up
            fc = full_cache_decode(model, sub, ctx, args, b, args.full_cache_steps)
            r = {"context": ctx, "pattern": pat, "full_cache_decode": fc, "latent_cache": args.kv_cache_dtype,
                 "cache_bytes_per_token_full_model": full_model_bytes_per_token(cfg_full, pat, args)}
            rows.append(r)
            write_results(args.name, {"meta": meta, "ceilings": ceilings, "args": vars(args), "rows": rows},
                          [args.out])
            print(f"ctx {ctx:>7}  {pat:<6} latent {args.kv_cache_dtype}  full-cache batch {fc['batch']}  "
                  f"{fc['step_ms']:.2f} ms/step  {fc['tok_s']:.0f} tok/s", flush=True)
            torch.cuda.empty_cache()
    return 0


def _speedups(rows):
    base = {r["context"]: r for r in rows if r["pattern"] in ("full", "all")}
    for r in rows:
        b = base.get(r["context"])
        if b:
            r["speedup_prefill"] = b["est_ttft_s"] / r["est_ttft_s"]
            if r.get("est_decode_tok_s") and b.get("est_decode_tok_s"):
                r["speedup_decode"] = r["est_decode_tok_s"] / b["est_decode_tok_s"]


def _plot(rows, name, out_dir):
    if not any("speedup_prefill" in r for r in rows):
        return "skipped: no full-DSA row to take speedups against (add 'full' to --patterns)"
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "skipped: matplotlib is not installed"
    import os
    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    for pat in sorted({r["pattern"] for r in rows}):
        rs = sorted((r for r in rows if r["pattern"] == pat and "speedup_prefill" in r), key=lambda r: r["context"])
        ax[0].plot([r["context"] / 1e3 for r in rs], [r["speedup_prefill"] for r in rs], "o-", label=pat)
        ax[1].plot([r["context"] / 1e3 for r in rs], [r.get("speedup_decode") or float("nan") for r in rs], "o-",
                   label=pat)
    for a, t in zip(ax, ("prefill (TTFT) speedup vs full DSA", "decode speedup vs full DSA")):
        a.set_xlabel("context (K tokens)")
        a.set_title(t)
        a.legend()
    paths = []
    for d in [out_dir] + ([os.environ["OUT"]] if os.environ.get("OUT") and os.environ["OUT"] != out_dir else []):
        os.makedirs(d, exist_ok=True)
        fig.savefig(os.path.join(d, f"{name}.png"), dpi=120)
        paths.append(os.path.join(d, f"{name}.png"))
    return paths


if __name__ == "__main__":
    raise SystemExit(main())
