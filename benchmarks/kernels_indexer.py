"""Indexer kernels on the GPU: prefill logits, bounded-memory 200K prefill selection, paged decode logits, cache
writes, FP8 top-k recall. Run: ``python -m benchmarks.kernels_indexer [--quick]``.

FLOPs as DeepGEMM counts them: 2 * (#valid (q,k) pairs) * H * 128. Decode bytes: 132 B per cached token read
plus 4 B per logit written. Every ratio is against ceilings measured in the same process.
"""
from __future__ import annotations

import sys
import time

import torch

from benchmarks.common import bench_ms, measure_ceilings, run_metadata, table, write_results
from indexcache.kernels import indexer as ix
from benchmarks.indexer_recall import KINDS, fp8_recall, make_case
from indexcache.kernels.indexer.reference import indexer_logits_decode_ref, indexer_logits_ref, topk_rows_torch
from indexcache.kernels import kv_store as kvs
from indexcache.kernels.kv_store import reference as kvref

DEV = "cuda"
MODELS = {"glm-4.7-flash-dsa": 32, "deepseek-v3.2": 64}
# problem sizes; "quick" for a short GPU check, "tiny" for a CPU dry run of the script logic (interpreter)
SIZES = {
    "full": dict(chunk=(8192, 200_000), sweep=(2048, 65536), vsref=(1024, 16384), prefill=200_000, decode=200_000,
                 recall=(256, 65536), writes=(64, 8192), topk=2048),
    "quick": dict(chunk=(2048, 32768), sweep=(2048, 16384), vsref=(1024, 16384), prefill=32768, decode=32768,
                  recall=(128, 16384), writes=(64, 8192), topk=2048),
    "tiny": dict(chunk=(8, 300), sweep=(8, 200), vsref=(4, 100), prefill=200, decode=200, recall=(4, 300),
                 writes=(5, 70), topk=16),
}
SZ = SIZES["full"]


def _prefill_inputs(t, s, h, seed=0):
    g = torch.Generator(device=DEV).manual_seed(seed)
    q = torch.randn(t, h, 128, device=DEV, dtype=torch.bfloat16, generator=g)
    w = torch.randn(t, h, device=DEV, dtype=torch.float32, generator=g)
    k = torch.randn(s, 128, device=DEV, dtype=torch.bfloat16, generator=g)
    q8, wf = ix.quantize_indexer_q(q, w)
    del q
    k8, ks = ix.quantize_indexer_k(k)
    re = torch.arange(s - t + 1, s + 1, dtype=torch.int32, device=DEV)  # last t rows of a causal prefill of s
    rs = torch.zeros(t, dtype=torch.int32, device=DEV)
    return q8, wf, k8, ks, rs, re


def _pairs(rs, re):
    return int((re.long() - rs.long()).clamp(min=0).sum())


def _row(name, shape, ms, ceil, *, flops=None, nbytes=None, ref_ms=None, **extra):
    r = {"name": name, "shape": shape, "ms": ms}
    if flops is not None:
        r["tflops"] = flops / ms / 1e9
        if ceil:
            r["frac_fp8_cublas"] = r["tflops"] / ceil["fp8_matmul_tflops"]
    if nbytes is not None:
        r["tbps"] = nbytes / ms / 1e9
        if ceil:
            r["frac_copy"] = r["tbps"] / ceil["copy_tbps"]
    if ref_ms is not None:
        r["speedup_vs_torch"] = ref_ms / ms
    r.update(extra)
    return r


def _sweep_prefill(rows, ceil, h, t, s):
    q8, w, k8, ks, rs, re = _prefill_inputs(t, s, h, seed=h)
    out = torch.empty(t, s, device=DEV)
    flops = 2 * _pairs(rs, re) * h * 128
    hp = max(16, 1 << (h - 1).bit_length())
    variants = [dict(BQ=max(1, n // hp), BKV=bkv, num_warps=nw, num_stages=st)
                for n, bkv, nw, st in ((256, 64, 8, 3), (256, 64, 4, 3), (256, 64, 8, 2), (256, 64, 8, 4),
                                       (128, 128, 4, 3), (128, 128, 4, 4), (128, 64, 4, 4), (128, 64, 8, 3))]
    best = None
    for cfg in variants:
        try:
            fn = lambda: ix.indexer_logits(q8, w, k8, ks, rs, re, out=out, config=cfg)  # noqa: E731
            fn()
            torch.cuda.synchronize()
            ms = bench_ms(fn, warmup_ms=10, rep_ms=40)
        except Exception as e:  # a config that fails to compile is reported, not fatal
            rows.append({"name": f"sweep prefill H={h}", "shape": str(cfg), "error": repr(e)[:200]})
            continue
        rows.append(_row(f"sweep prefill H={h}", f"T={t} S={s} {cfg}", ms, ceil, flops=flops))
        if best is None or ms < best[0]:
            best = (ms, cfg)
    del q8, w, k8, ks, out
    torch.cuda.empty_cache()
    return best[1] if best else {}


def bench_prefill(rows, ceil, quick):
    t, s = SZ["chunk"]
    chosen = {}
    for model, h in MODELS.items():
        cfg = _sweep_prefill(rows, ceil, h, *SZ["sweep"])
        chosen[h] = cfg
        q8, w, k8, ks, rs, re = _prefill_inputs(t, s, h, seed=1)
        out = torch.empty(t, s, device=DEV)
        flops = 2 * _pairs(rs, re) * h * 128
        ms = bench_ms(lambda: ix.indexer_logits(q8, w, k8, ks, rs, re, out=out, config=cfg))
        rows.append(_row(f"prefill logits {model}", f"H={h} last {t} rows of causal {s}", ms, ceil, flops=flops,
                         config=str(cfg)))
        del q8, w, k8, ks, out
        # speedup vs the torch reference on a size the reference can do
        tt, ss = SZ["vsref"]
        q8, w, k8, ks, rs, re = _prefill_inputs(tt, ss, h, seed=2)
        ref_ms = bench_ms(lambda: indexer_logits_ref(q8, w, k8, ks, rs, re), warmup_ms=5, rep_ms=30)
        ms = bench_ms(lambda: ix.indexer_logits(q8, w, k8, ks, rs, re, config=cfg))
        rows.append(_row(f"prefill logits {model} (vs ref)", f"H={h} T={tt} S={ss}", ms, ceil,
                         flops=2 * _pairs(rs, re) * h * 128, ref_ms=ref_ms))
        del q8, w, k8, ks
        torch.cuda.empty_cache()
    return chosen


def bench_full_prefill(rows, ceil, quick, chosen):
    s = SZ["prefill"]
    topk = SZ["topk"]
    fn = ix.default_topk_fn()
    fn_name = f"{fn.__module__}.{fn.__name__}"
    for model, h in MODELS.items():
        q8, w, k8, ks, rs, re = _prefill_inputs(s, s, h, seed=3)
        flops = 2 * _pairs(rs, re) * h * 128
        out = torch.empty(s, topk, dtype=torch.int32, device=DEV)
        ix.indexer_topk_prefill(q8[:4096], w[:4096], k8, ks, rs[:4096], re[:4096], topk, out=out[:4096])  # warm-up
        noop = lambda lg, k, row_start=None, row_end=None: torch.empty(  # noqa: E731
            lg.shape[0], k, dtype=torch.int32, device=lg.device)
        variants = [("logits only (no-op select)", noop), ("logits+torch.topk", topk_rows_torch),
                    ("logits+top-k", None)]
        for label, tfn in variants:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            t0 = time.perf_counter()
            ix.indexer_topk_prefill(q8, w, k8, ks, rs, re, topk, topk_fn=tfn, out=out)
            torch.cuda.synchronize()
            ms = (time.perf_counter() - t0) * 1e3
            peak = torch.cuda.max_memory_allocated() - base
            rows.append(_row(f"full prefill {model}: {label}", f"H={h} causal {s}, topk {topk}, ws 2GiB", ms, ceil,
                             flops=flops, peak_extra_gib=peak / 2**30,
                             chunks=len(ix.plan_prefill_chunks(rs, re, topk, 2 << 30, ix.selection_slot_bytes(tfn or fn, topk, s))),
                             topk_fn=fn_name if tfn is None else getattr(tfn, "__name__", "?")))
        del q8, w, k8, ks, out
        torch.cuda.empty_cache()


def _decode_case(b, ctx, h, seed=0):
    g = torch.Generator(device=DEV).manual_seed(seed)
    pages_per = (ctx + 63) // 64
    cache = torch.randint(0, 120, (b * pages_per + 1, 8448), device=DEV, dtype=torch.uint8, generator=g)
    cache.view(torch.float32)[:, 2048:] = torch.rand(cache.shape[0], 64, device=DEV, generator=g) + 0.5
    bt = torch.randperm(b * pages_per, device=DEV, generator=g).view(b, pages_per).to(torch.int32)
    q8, w = ix.quantize_indexer_q(torch.randn(b, h, 128, device=DEV, generator=g), torch.randn(b, h, device=DEV, generator=g))
    cl = torch.full((b,), ctx, dtype=torch.int32, device=DEV)
    return q8, w, cache, bt, cl


def bench_decode(rows, ceil, quick):
    ctx = SZ["decode"]
    topk = SZ["topk"]
    # small sweep at B=8
    q8, w, cache, bt, cl = _decode_case(8, ctx, 64)
    best = None
    for pages in (1, 2, 4):
        for nw in (4, 8):
            cfg = dict(PAGES=pages, num_warps=nw, num_stages=1)
            fn = lambda: ix.indexer_logits_decode(q8, w, cache, bt, cl, ctx, config=cfg)  # noqa: E731
            ms = bench_ms(fn)
            rows.append(_row("sweep decode H=64", f"B=8 ctx={ctx} {cfg}", ms, ceil, nbytes=8 * ctx * 136))
            if best is None or ms < best[0]:
                best = (ms, cfg)
    del q8, w, cache, bt, cl
    for model, h in MODELS.items():
        for b in (1, 8, 64):
            q8, w, cache, bt, cl = _decode_case(b, ctx, h, seed=b)
            nbytes = b * ctx * 132 + b * ctx * 4
            ref_ms = None
            if b == 1:
                ref_ms = bench_ms(lambda: indexer_logits_decode_ref(q8, w, cache, bt, cl, ctx), warmup_ms=5, rep_ms=30)
            ms = bench_ms(lambda: ix.indexer_logits_decode(q8, w, cache, bt, cl, ctx, config=best[1]))
            rows.append(_row(f"decode logits {model}", f"B={b} ctx={ctx}", ms, ceil, nbytes=nbytes, ref_ms=ref_ms,
                             config=str(best[1])))
            ms = bench_ms(lambda: ix.indexer_topk_decode(q8, w, cache, bt, cl, ctx, topk))
            rows.append(_row(f"decode logits+top-k {model}", f"B={b} ctx={ctx} k=2048", ms, ceil, nbytes=nbytes,
                             topk_fn=ix.default_topk_fn().__module__))
            del q8, w, cache, bt, cl
    torch.cuda.empty_cache()


def bench_cache_writes(rows, ceil):
    for t in SZ["writes"]:
        pages = t // 64 + 4
        slots = torch.randperm(pages * 64, device=DEV)[:t]
        k = torch.randn(t, 128, device=DEV, dtype=torch.bfloat16)
        cache = torch.zeros(pages, 8448, dtype=torch.uint8, device=DEV)
        ms = bench_ms(lambda: kvs.store_indexer_k(cache, slots, k))
        ref_ms = bench_ms(lambda: kvref.store_indexer_k_ref(cache, slots, k))
        rows.append(_row("store_indexer_k", f"T={t} bf16", ms, ceil, nbytes=t * (256 + 8 + 132), ref_ms=ref_ms))
        ckv = torch.randn(t, 512, device=DEV, dtype=torch.bfloat16)
        kpe = torch.randn(t, 64, device=DEV, dtype=torch.bfloat16)
        c8 = torch.zeros(pages, 64, 656, dtype=torch.uint8, device=DEV)
        ms = bench_ms(lambda: kvs.store_latent_fp8(c8, slots, ckv, kpe))
        ref_ms = bench_ms(lambda: kvref.store_latent_fp8_ref(c8, slots, ckv, kpe))
        rows.append(_row("store_latent_fp8", f"T={t} bf16", ms, ceil, nbytes=t * (1152 + 8 + 656), ref_ms=ref_ms))
        c16 = torch.zeros(pages, 64, 576, dtype=torch.bfloat16, device=DEV)
        ms = bench_ms(lambda: kvs.store_latent_bf16(c16, slots, ckv, kpe))
        ref_ms = bench_ms(lambda: kvref.store_latent_bf16_ref(c16, slots, ckv, kpe))
        rows.append(_row("store_latent_bf16", f"T={t} bf16", ms, ceil, nbytes=t * (1152 + 8 + 1152), ref_ms=ref_ms))


def bench_recall(rows, quick):
    t, s = SZ["recall"]
    for kind in KINDS:
        for had in (False, True):
            case = make_case(kind, t, s, 64, seed=5, device=DEV)
            rec = fp8_recall(*case, SZ["topk"], hadamard=had, topk_fn=topk_rows_torch)
            rows.append({"name": f"fp8 top-k recall {kind}", "shape": f"H=64 T={t} S={s} k={SZ['topk']} hadamard={had}",
                         "recall": rec})


def run(quick: bool = False, ceilings: dict | None = None) -> list[dict]:
    global SZ
    if SZ is not SIZES["tiny"]:
        SZ = SIZES["quick" if quick else "full"]
    rows: list[dict] = []
    chosen = bench_prefill(rows, ceilings, quick)
    bench_full_prefill(rows, ceilings, quick, chosen)
    bench_decode(rows, ceilings, quick)
    bench_cache_writes(rows, ceilings)
    bench_recall(rows, quick)
    return rows


def main():
    quick = "--quick" in sys.argv
    ceil = measure_ceilings()
    print("ceilings:", ceil, flush=True)
    rows = run(quick, ceil)
    cols = ["name", "shape", "ms", "tflops", "frac_fp8_cublas", "tbps", "frac_copy", "speedup_vs_torch",
            "peak_extra_gib", "recall"]
    print(table([r for r in rows if not r["name"].startswith("sweep")], cols))
    print(table([r for r in rows if r["name"].startswith("sweep")], ["name", "shape", "ms", "tflops", "tbps", "error"]))
    write_results("kernels_indexer" + ("_quick" if quick else ""), {"meta": run_metadata(), "ceilings": ceil,
                                                                     "rows": rows})


if __name__ == "__main__":
    main()
