"""Top-k and sparse MLA kernels on the GPU at glm-4.7-flash-dsa (20 heads) and DeepSeek-V3.2 (128 heads) shapes.

run(ceilings, quick) -> rows: name, shape, ms, tflops or tbps, frac (of the same-run ceiling), speedup (over the
PyTorch reference or torch.topk). Work is counted as FlashMLA / the brief count it:
  top-k: bytes = logits read once (sum of row lengths x 4 B);
  sparse MLA prefill: FLOP = 2 * T * topk * h * (576 + 512);
  sparse MLA decode: bytes = Q bf16 + unique retrieved tokens x (656 | 1152) B + O bf16.
Decode cases are timed as CUDA-graph replays (what the engine runs); eager time is reported beside.
Sparse MLA: every variant (prefill "default" / "split_dv" / "split_acc" / "swap_ab" (h<=32); fp8 decode "fused" /
"dequant") is timed in the same run as its own row (variant in brackets in the shape), same FLOP/byte counts, with
rel_vs_default = its output's relative difference from the first variant's; a variant that fails is reported as an
error row and the other cases go on.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.testing

from benchmarks.common import bench_ms
from indexcache.kernels import sparse_mla as sm
from indexcache.kernels.sparse_mla import quantize_latent_fp8_reference, sparse_mla_decode, sparse_mla_prefill
from indexcache.kernels import topk as tp
from indexcache.kernels.topk import topk_rows

CTX = 200_000
K = 2048


def _graph_ms(fn):
    return float(triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median"))


def _row(name, shape, ms, ceilings, *, tflops=None, tbps=None, ref_ms=None, **extra):
    r = {"name": name, "shape": shape, "ms": ms}
    if tflops is not None:
        r["tflops"] = tflops
        if ceilings:
            r["frac"] = tflops / ceilings["bf16_matmul_tflops"]
            r["ceiling"] = "bf16_matmul"
    if tbps is not None:
        r["tbps"] = tbps
        if ceilings:
            r["frac"] = tbps / ceilings["copy_tbps"]
            r["ceiling"] = "copy"
    if ref_ms is not None:
        r["speedup"] = ref_ms / ms
    r.update(extra)
    return r


def _topk_breakdown(x, ends):
    """Per-launch time of one call (decode path: sample, scan = fused count+compact, final; prefill path: sample,
    count, compact, final), timed cumulatively (each launch behind the ones before it: the scan's atomic counters
    are reset by the sample launch, the compact reads the count's output), plus fallback rows, the mean bracket
    size and the path taken."""
    tp.DEBUG = {}
    topk_rows(x, K, row_end=ends)
    fb, mean_bracket = tp.bracket_stats(tp.DEBUG, K)
    path = tp.DEBUG.get("path")
    tp.DEBUG = None
    stages, _, _ = tp._plan(x, K, None, ends)
    t, prev = {}, 0.0
    for n in range(1, len(stages) + 1):
        fns = [fn for _, fn in stages[:n]]
        ms = bench_ms(lambda: [f() for f in fns], rep_ms=30)
        t[stages[n - 1][0]] = ms - prev
        prev = ms
    t["fallback_rows"] = fb
    t["mean_bracket"] = mean_bracket
    t["path"] = path
    return t


# prefill-path configs swept on the 4096 x 200K case (module knobs of indexcache.kernels.topk; each config is a
# fixed constexpr set, so it compiles once). "scan_*" is the fused decode scan used for prefill (2f1bfc4 design).
_TOPK_PREFILL_CONFIGS = {
    "two16_b4096_cb1_c8_p4": dict(_PREFILL_PATH="two", _PREFILL_SEL16=True, _TP_BLOCK=4096, _TP_CHUNK_BLOCKS=1,
                                  _COUNT_WARPS=8, _COMPACT_WARPS=4),
    "two16_b4096_cb1_c4_p8": dict(_PREFILL_PATH="two", _PREFILL_SEL16=True, _TP_BLOCK=4096, _TP_CHUNK_BLOCKS=1,
                                  _COUNT_WARPS=4, _COMPACT_WARPS=8),
    "two16_b2048_cb1_c4_p4": dict(_PREFILL_PATH="two", _PREFILL_SEL16=True, _TP_BLOCK=2048, _TP_CHUNK_BLOCKS=1,
                                  _COUNT_WARPS=4, _COMPACT_WARPS=4),
    "two16_b4096_cb4_c8_p4": dict(_PREFILL_PATH="two", _PREFILL_SEL16=True, _TP_BLOCK=4096, _TP_CHUNK_BLOCKS=4,
                                  _COUNT_WARPS=8, _COMPACT_WARPS=4),
    "two16_b4096_row_c8_p4": dict(_PREFILL_PATH="two", _PREFILL_SEL16=True, _TP_BLOCK=4096, _TP_CHUNK_BLOCKS=0,
                                  _COUNT_WARPS=8, _COMPACT_WARPS=4),
    "twohist_b4096_cb1_c8_p4": dict(_PREFILL_PATH="two", _PREFILL_SEL16=False, _TP_BLOCK=4096, _TP_CHUNK_BLOCKS=1,
                                    _COUNT_WARPS=8, _COMPACT_WARPS=4),
    "scan_b4096_w4": dict(_PREFILL_PATH="scan", _BLOCK=4096, _SCAN_WARPS=4),
}


def _set_knobs(cfg):
    for name, v in cfg.items():
        setattr(tp, name, v)


def topk_cases(ceilings, quick):
    rows = []
    R = 1024 if quick else 4096
    # last R query rows of a causal 200K prefill: row i sees CTX - R + i + 1 keys
    x = torch.randn(R, CTX, device="cuda")
    ends = torch.arange(CTX - R + 1, CTX + 1, device="cuda", dtype=torch.int32)
    x.masked_fill_(torch.arange(CTX, device="cuda")[None, :] >= ends[:, None], float("-inf"))
    nbytes = ends.double().sum().item() * 4
    ref = bench_ms(lambda: torch.topk(x, K, dim=1, sorted=False))
    xd = {B: torch.randn(B, CTX, device="cuda") for B in (1, 8, 64)}
    # small sweep (prefill path / block / warps / final select; decode sample size): the best is kept for the
    # reported rows; the parts of every prefill config are printed so count / compact / final can be compared
    sweep, sweep_parts = {}, {}
    dflt = {n: getattr(tp, n) for cfg in _TOPK_PREFILL_CONFIGS.values() for n in cfg}
    for name, cfg in _TOPK_PREFILL_CONFIGS.items():
        _set_knobs(dflt)
        _set_knobs(cfg)
        try:
            sweep[name] = bench_ms(lambda: topk_rows(x, K, row_end=ends), rep_ms=60)
            sweep_parts[name] = _topk_breakdown(x, ends)
        except Exception as e:  # one config failing (e.g. out of resources) must not hide the others
            print("topk config", name, "failed:", repr(e)[:200])
        print("topk prefill config", name, sweep.get(name), sweep_parts.get(name))
    best = min(sweep, key=sweep.get)
    _set_knobs(dflt)
    _set_knobs(_TOPK_PREFILL_CONFIGS[best])
    for S in (512, 1024):
        tp._SAMPLE_SMALL = S
        sweep[f"decode_S{S}"] = _graph_ms(lambda: topk_rows(xd[8], K))
    tp._SAMPLE_SMALL = min((512, 1024), key=lambda S: sweep[f"decode_S{S}"])
    print("topk sweep (ms):", sweep, "->", best, "decode S", tp._SAMPLE_SMALL)
    ms = bench_ms(lambda: topk_rows(x, K, row_end=ends))
    rows.append(_row("topk_prefill", f"{R}x{CTX} causal k={K} fp32", ms, ceilings, tbps=nbytes / ms / 1e9,
                     ref_ms=ref, config=best, parts=_topk_breakdown(x, ends), sweep=str(sweep),
                     sweep_parts=str(sweep_parts)))
    print("topk prefill parts:", rows[-1]["parts"])
    del x
    for B in (1, 8, 64):
        x = xd[B]
        ms = _graph_ms(lambda: topk_rows(x, K))
        eager = bench_ms(lambda: topk_rows(x, K))
        ref = _graph_ms(lambda: torch.topk(x, K, dim=1, sorted=False))
        rows.append(_row("topk_decode", f"B={B}x{CTX} k={K} fp32", ms, ceilings, tbps=B * CTX * 4 / ms / 1e9,
                         ref_ms=ref, us=ms * 1e3, eager_ms=eager, sample=tp._SAMPLE_SMALL if B <= tp._SMALL_R
                         else tp._SAMPLE))
    rows[-3]["parts"] = _topk_breakdown(xd[1], None)
    print("topk decode B=1 parts:", rows[-3]["parts"])
    # recompile check: a run of shapes that a prefill / decode loop produces must reuse the compiled kernels
    from indexcache.kernels.topk import triton_topk as tk
    kern = (tk._topk_sample_kernel, tk._topk_scan_kernel, tk._topk_count_kernel, tk._topk_compact_kernel,
            tk._topk_final_kernel)

    def ncompiled():
        return sum(sum(len(c[0]) for c in getattr(f, "device_caches", {}).values()) for f in kern)
    n0 = ncompiled()
    for L in (150_001, 150_002, 170_000, 199_999):
        topk_rows(torch.randn(3, L, device="cuda"), K)
        topk_rows(torch.randn(1, L, device="cuda"), K)
    for R2, L in ((100, 150_001), (65, 150_002), (300, 70_001), (257, 99_999)):   # prefill path, other shapes
        topk_rows(torch.randn(R2, L, device="cuda"), K, row_end=torch.arange(L - R2 + 1, L + 1, device="cuda",
                                                                             dtype=torch.int32))
    torch.cuda.synchronize()
    rows[-1]["new_variants_over_shape_sweep"] = ncompiled() - n0
    print("topk variants compiled by a shape sweep (want 0):", ncompiled() - n0)
    return rows


def _prefill_ref(q, kv, idx, scale):
    g = kv[idx.long()].float()
    s = torch.einsum("thd,tkd->thk", q.float(), g) * scale
    return torch.einsum("thk,tkd->thd", torch.softmax(s, -1), g[..., :512]).to(q.dtype)


def _variant_check(out, ref):
    """Relative error of a variant's output against the default kernel's on the same inputs."""
    return float(((out.float() - ref.float()).norm() / ref.float().norm()).item())


def _sweep(name, table, configs, fn):
    """Time fn under each config (copied into table[...]) on a small case; keep the fastest; failures -> inf."""
    res = {}
    for cfg in configs:
        table.update(cfg)
        try:
            res[str(cfg)] = bench_ms(fn, rep_ms=40)
        except Exception as e:  # compile error / out of resources: report, try the next config
            res[str(cfg)] = float("inf")
            print(f"{name}: config {cfg} failed: {repr(e)[:200]}")
    print(f"{name} sweep:", res)
    best = min(res, key=res.get)
    if res[best] != float("inf"):
        table.update(eval(best))  # noqa: S307 (our own dict literal)
    return res


# variants timed side by side at each head count; configs swept on the first 2048 queries (one compile each; the
# kernel stage of gpu_run.sh is time-boxed, so keep these lists short). BENCH_SPARSE_VARIANTS=a,b limits the variants.
PREFILL_VARIANT_SWEEPS = {
    "split_dv": [{"bt": 64, "num_warps": 8, "num_stages": 2}, {"bt": 32, "num_warps": 8, "num_stages": 3}],
    "split_acc": [{"bt": 64, "num_warps": 8, "num_stages": 2}],
    "swap_ab": [{"bt": 64, "num_warps": 4, "num_stages": 2}, {"bt": 64, "num_warps": 8, "num_stages": 2}],
}
PREFILL_VARIANTS_BY_HEADS = {128: ("default", "split_dv", "split_acc"), 20: ("default", "swap_ab", "split_dv")}


def _wanted(variant):
    import os
    sel = os.environ.get("BENCH_SPARSE_VARIANTS")
    return variant in ("default", "fused") or not sel or variant in sel.split(",")


def sparse_prefill_cases(ceilings, quick):
    rows = []
    T = 2048 if quick else 8192
    kv = torch.randn(CTX, 576, device="cuda", dtype=torch.bfloat16)
    # causal-ish: each query takes 2048 distinct-ish keys from the whole 200K
    idx = torch.randint(0, CTX, (T, K), device="cuda", dtype=torch.int32)
    best = dict(sm.PREFILL_CFG)
    for h in (128, 20):
        q = torch.randn(T, h, 576, device="cuda", dtype=torch.bfloat16)
        if h == 20:   # few heads: HB=32 tiles; try 4 vs 8 warps and 32 vs 64 tokens per step
            sweep = {}
            for cfg in ({"bt": 64, "num_warps": 8, "num_stages": 2}, {"bt": 64, "num_warps": 4, "num_stages": 2},
                        {"bt": 32, "num_warps": 4, "num_stages": 3}):
                sm.PREFILL_CFG_FEW_HEADS.update(cfg)
                try:
                    sweep[str(cfg)] = bench_ms(lambda: sparse_mla_prefill(q[:2048], kv, idx[:2048], 0.1352),
                                               rep_ms=40)
                except Exception as e:
                    sweep[str(cfg)] = float("inf")
                    print("config failed", cfg, repr(e)[:200])
            print("sparse prefill h=20 sweep:", sweep)
            best = eval(min(sweep, key=sweep.get))  # noqa: S307 (our own dict literal)
            sm.PREFILL_CFG_FEW_HEADS.update(best)
        flop = 2 * T * K * h * (576 + 512)
        nr = 128
        ref = bench_ms(lambda: _prefill_ref(q[:nr], kv, idx[:nr], 0.1352), rep_ms=50) * T / nr
        variants = [v for v in PREFILL_VARIANTS_BY_HEADS[h] if _wanted(v)]
        check = None
        for variant in variants:
            shape = f"T={T} h={h} topk={K} S={CTX} bf16 [{variant}]"
            try:
                extra = {}
                if variant == "default":
                    cfg = best if h <= 32 else sm.PREFILL_CFG
                else:
                    sw = _sweep(f"sparse prefill h={h} {variant}", sm.PREFILL_VARIANT_CFG[variant],
                                PREFILL_VARIANT_SWEEPS[variant][:1 if h <= 32 and variant == "split_dv" else None],
                                lambda: sparse_mla_prefill(q[:2048], kv, idx[:2048], 0.1352, variant=variant))
                    cfg = sm.PREFILL_VARIANT_CFG[variant]
                    extra["sweep"] = str(sw)
                o, _ = sparse_mla_prefill(q[:256], kv, idx[:256], 0.1352, variant=variant)
                if check is None:
                    check = o
                extra["rel_vs_default"] = _variant_check(o, check)
                ms = bench_ms(lambda: sparse_mla_prefill(q, kv, idx, 0.1352, variant=variant))
                rows.append(_row("sparse_mla_prefill", shape, ms, ceilings, tflops=flop / ms / 1e9, ref_ms=ref,
                                 extrapolated_200k_ms=ms * CTX / T, cfg=str(cfg), variant=variant, **extra))
            except Exception as e:  # one variant failing to compile must not hide the others
                import traceback
                traceback.print_exc()
                rows.append({"name": "sparse_mla_prefill", "shape": shape, "variant": variant,
                             "error": repr(e)[:300]})
            print(rows[-1])
        del q
        torch.cuda.empty_cache()
    return rows


def _decode_ref(q, cache, idx, scale, fmt):
    flat = cache.reshape(-1, cache.shape[-1])
    g = flat[idx.long()]
    g = sm.dequant_latent_fp8_reference(g) if fmt == "fp8" else g.float()
    s = torch.einsum("bhd,bkd->bhk", q.float(), g) * scale
    return torch.einsum("bhk,bkd->bhd", torch.softmax(s, -1), g[..., :512]).to(q.dtype)


def _dequant_only_ms(cache, idx, dtype):
    """The gather-dequant launch of fp8_strategy="dequant" alone (graph replay)."""
    from indexcache.kernels.sparse_mla import triton_sparse_mla as tm
    B, k = idx.shape
    n = B * k
    flat = cache.reshape(-1, cache.shape[-1])
    rows = torch.empty(n, 576, device="cuda", dtype=dtype)
    idx2 = torch.empty(B, k, device="cuda", dtype=torch.int32)
    cfg = sm.DECODE_CFG["fp8_dequant"]
    r = cfg["dq_rows"]
    return _graph_ms(lambda: tm._fp8_gather_dequant_kernel[(triton.cdiv(n, r),)](
        flat, flat.view(torch.float32), flat.view(torch.bfloat16), idx, rows, idx2, flat.shape[0], n, R=r,
        num_warps=cfg["dq_warps"]))


def sparse_decode_cases(ceilings, quick):
    rows = []
    pool = 1 << 21                               # 2M token slots, page 64 (>> L2 for either format)
    ps = 64
    lat_bf16 = torch.empty(pool, 576, device="cuda", dtype=torch.bfloat16)
    for i in range(0, pool, 1 << 18):
        lat_bf16[i:i + (1 << 18)] = torch.randn(1 << 18, 576, device="cuda")
    caches = {"bf16": lat_bf16.view(pool // ps, ps, 576)}
    c8 = torch.empty(pool, 656, device="cuda", dtype=torch.uint8)
    for i in range(0, pool, 1 << 18):
        c8[i:i + (1 << 18)] = quantize_latent_fp8_reference(lat_bf16[i:i + (1 << 18)])
    caches["fp8"] = c8.view(pool // ps, ps, 656)
    for h, fmts in ((128, ("fp8", "bf16")), (20, ("fp8",))):
        for fmt in fmts:
            for B in (1, 8, 64):
                q = torch.randn(B, h, 576, device="cuda", dtype=torch.bfloat16)
                # each sequence reads 2048 of its own 200K-token context, scattered over the pool
                idx = (torch.randint(0, CTX, (B, K), device="cuda") * 7 + torch.arange(B, device="cuda")[:, None]
                       * 1_000_003) % pool
                idx = idx.to(torch.int32)
                cache = caches[fmt]
                uniq = sum(torch.unique(idx[b]).numel() for b in range(B))
                nbytes = B * h * 576 * 2 + uniq * (656 if fmt == "fp8" else 1152) + B * h * 512 * 2
                ref = bench_ms(lambda: _decode_ref(q, cache, idx, 0.1352, fmt), rep_ms=50)
                flop = 2 * h * B * K * (576 + 512)
                check = None
                for strat in [v for v in (("fused", "dequant") if fmt == "fp8" else ("fused",)) if _wanted(v)]:
                    shape = f"B={B} h={h} topk={K} {fmt} cache" + (f" [{strat}]" if fmt == "fp8" else "")
                    try:
                        extra = {}
                        ws = None
                        if strat == "dequant":   # fixed workspace, as a CUDA-graph caller would pass it
                            ws = torch.empty(sm.sparse_mla_decode_workspace_bytes(
                                B, h, K, dtype=q.dtype, kv_format=fmt, fp8_strategy=strat), dtype=torch.uint8,
                                device="cuda")
                        fn = lambda: sparse_mla_decode(q, cache, idx, 0.1352, kv_format=fmt,  # noqa: E731
                                                       fp8_strategy=strat, workspace=ws)
                        o, _ = fn()
                        if check is None:
                            check = o
                        extra["rel_vs_default"] = _variant_check(o, check)
                        ms = _graph_ms(fn)
                        eager = bench_ms(fn)
                        key = "fp8_dequant" if strat == "dequant" else fmt
                        if strat == "dequant":
                            extra["dequant_us"] = _dequant_only_ms(cache, idx, q.dtype) * 1e3
                        rows.append(_row("sparse_mla_decode", shape, ms, ceilings, tbps=nbytes / ms / 1e9,
                                         ref_ms=ref, us=ms * 1e3, eager_ms=eager, tflops_equiv=flop / ms / 1e9,
                                         cfg=str(sm.DECODE_CFG[key]), variant=strat, **extra))
                    except Exception as e:  # one strategy failing must not hide the others
                        import traceback
                        traceback.print_exc()
                        rows.append({"name": "sparse_mla_decode", "shape": shape, "variant": strat,
                                     "error": repr(e)[:300]})
                    print(rows[-1])
    return rows


_CASE_GROUPS = {"topk": ("topk_cases",), "sparse": ("sparse_prefill_cases", "sparse_decode_cases"),
                "sparse_prefill": ("sparse_prefill_cases",), "sparse_decode": ("sparse_decode_cases",)}


def _selected(fns):
    """BENCH_ONLY=topk (or a comma list of topk / sparse / sparse_prefill / sparse_decode) runs only those cases."""
    only = os.environ.get("BENCH_ONLY")
    if not only:
        return fns
    names = {n for g in only.split(",") if g.strip() for n in _CASE_GROUPS.get(g.strip(), (g.strip(),))}
    return tuple(fn for fn in fns if fn.__name__ in names)


def run(ceilings: dict | None = None, quick: bool = False) -> list[dict]:
    rows = []
    for fn in _selected((topk_cases, sparse_prefill_cases, sparse_decode_cases)):
        try:
            rows += fn(ceilings, quick)
        except Exception as e:  # report and keep going: one broken case must not hide the others
            import traceback
            traceback.print_exc()
            rows.append({"name": fn.__name__, "error": repr(e)[:300]})
        torch.cuda.empty_cache()
    return rows


if __name__ == "__main__":   # standalone: BENCH_ONLY=topk python -m benchmarks.kernels_attention [--quick]
    import sys
    for r in run(None, quick="--quick" in sys.argv):
        print(r)
