"""Top-k and sparse MLA kernels on the GPU at glm-4.7-flash-dsa (20 heads) and DeepSeek-V3.2 (128 heads) shapes.

run(ceilings, quick) -> rows: name, shape, ms, tflops or tbps, frac (of the same-run ceiling), speedup (over the
PyTorch reference or torch.topk). Work is counted as FlashMLA / the brief count it:
  top-k: bytes = logits read once (sum of row lengths x 4 B);
  sparse MLA prefill: FLOP = 2 * T * topk * h * (576 + 512);
  sparse MLA decode: bytes = Q bf16 + unique retrieved tokens x (656 | 1152) B + O bf16.
Decode cases are timed as CUDA-graph replays (what the engine runs); eager time is reported beside.
A case that fails is reported as an error row and the other cases go on.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.testing

from benchmarks.common import bench_ms
from indexcache.kernels.sparse_mla import (dequant_latent_fp8_reference, quantize_latent_fp8_reference,
                                           sparse_mla_decode, sparse_mla_decode_workspace_bytes, sparse_mla_prefill)
from indexcache.kernels.sparse_mla import ops as sm_ops
from indexcache.kernels.topk import bracket_stats, plan_launches, topk_rows
from indexcache.kernels.topk import ops as tk_ops

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


def _topk_breakdown(x, ends, sample=None):
    """Per-launch time of one call (decode path: sample, scan = fused count+compact, final; prefill path: the one
    select launch), timed cumulatively (each launch behind the ones before it: the scan's atomic counters are reset
    by the sample launch), plus fallback rows, the mean bracket size and the path taken."""
    stats = {}
    topk_rows(x, K, row_end=ends, stats=stats, sample=sample)
    fb, mean_bracket = bracket_stats(stats, K)
    stages, _, _ = plan_launches(x, K, None, ends, sample=sample)
    t, prev = {}, 0.0
    for n in range(1, len(stages) + 1):
        fns = [fn for _, fn in stages[:n]]
        ms = bench_ms(lambda: [f() for f in fns], rep_ms=30)
        t[stages[n - 1][0]] = ms - prev
        prev = ms
    t["fallback_rows"] = fb
    t["mean_bracket"] = mean_bracket
    t["path"] = stats.get("path")
    return t


def topk_cases(ceilings, quick):
    rows = []
    R = 1024 if quick else 4096
    # last R query rows of a causal 200K prefill: row i sees CTX - R + i + 1 keys
    x = torch.randn(R, CTX, device="cuda")
    ends = torch.arange(CTX - R + 1, CTX + 1, device="cuda", dtype=torch.int32)
    x.masked_fill_(torch.arange(CTX, device="cuda")[None, :] >= ends[:, None], float("-inf"))
    nbytes = ends.double().sum().item() * 4
    ref = bench_ms(lambda: torch.topk(x, K, dim=1, sorted=False))
    ms = bench_ms(lambda: topk_rows(x, K, row_end=ends))
    rows.append(_row("topk_prefill", f"{R}x{CTX} causal k={K} fp32", ms, ceilings, tbps=nbytes / ms / 1e9,
                     ref_ms=ref, parts=_topk_breakdown(x, ends)))
    print("topk prefill parts:", rows[-1]["parts"])
    del x
    R1, L1 = (128, 1 << 20) if quick else (256, 1 << 20)    # 1M-token rows (the 1M prefill's last chunk; R > 64)
    y = torch.randn(R1, L1, device="cuda")
    ref = bench_ms(lambda: torch.topk(y, K, dim=1, sorted=False), rep_ms=50)
    ms = bench_ms(lambda: topk_rows(y, K), rep_ms=50)
    rows.append(_row("topk_prefill 1M", f"{R1}x{L1} k={K} fp32", ms, ceilings, tbps=R1 * L1 * 4 / ms / 1e9,
                     ref_ms=ref, parts=_topk_breakdown(y, None)))
    print("topk prefill 1M parts:", rows[-1]["parts"])
    del y
    # decode: the default sample size (512 for R <= 64) against 1024, at B=8
    xd = {B: torch.randn(B, CTX, device="cuda") for B in (1, 8, 64)}
    sweep = {f"decode_S{S}": _graph_ms(lambda: topk_rows(xd[8], K, sample=S)) for S in (512, 1024)}
    print("topk decode sample sweep (ms):", sweep)
    for B in (1, 8, 64):
        x = xd[B]
        ms = _graph_ms(lambda: topk_rows(x, K))
        eager = bench_ms(lambda: topk_rows(x, K))
        ref = _graph_ms(lambda: torch.topk(x, K, dim=1, sorted=False))
        rows.append(_row("topk_decode", f"B={B}x{CTX} k={K} fp32", ms, ceilings, tbps=B * CTX * 4 / ms / 1e9,
                         ref_ms=ref, us=ms * 1e3, eager_ms=eager, sample=tk_ops._SAMPLE_SMALL if B <= tk_ops._SMALL_R
                         else tk_ops._SAMPLE))
    rows[-3]["parts"] = _topk_breakdown(xd[1], None)
    rows[-2]["sample_sweep"] = str(sweep)
    print("topk decode B=1 parts:", rows[-3]["parts"])
    # recompile check: a run of shapes that a prefill / decode loop produces must reuse the compiled kernels
    from indexcache.kernels.topk import triton as tk
    from indexcache.kernels.topk import triton as t1
    kern = (tk._topk_sample_kernel, tk._topk_scan_kernel, tk._topk_final_kernel, t1._topk1_kernel)

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


def sparse_prefill_cases(ceilings, quick):
    rows = []
    T = 2048 if quick else 8192
    kv = torch.randn(CTX, 576, device="cuda", dtype=torch.bfloat16)
    # causal-ish: each query takes 2048 distinct-ish keys from the whole 200K
    idx = torch.randint(0, CTX, (T, K), device="cuda", dtype=torch.int32)
    for h in (128, 20):
        q = torch.randn(T, h, 576, device="cuda", dtype=torch.bfloat16)
        cfg = None
        if h == 20:   # few heads: HB=32 tiles; try 4 vs 8 warps and 32 vs 64 tokens per step
            sweep = {}
            for c in ({"bt": 64, "num_warps": 8, "num_stages": 2}, {"bt": 64, "num_warps": 4, "num_stages": 2},
                      {"bt": 32, "num_warps": 4, "num_stages": 3}):
                try:
                    sweep[str(c)] = bench_ms(lambda: sparse_mla_prefill(q[:2048], kv, idx[:2048], 0.1352, config=c),
                                             rep_ms=40)
                except Exception as e:
                    sweep[str(c)] = float("inf")
                    print("config failed", c, repr(e)[:200])
            print("sparse prefill h=20 sweep:", sweep)
            cfg = eval(min(sweep, key=sweep.get))  # noqa: S307 (our own dict literal)
        flop = 2 * T * K * h * (576 + 512)
        nr = 128
        ref = bench_ms(lambda: _prefill_ref(q[:nr], kv, idx[:nr], 0.1352), rep_ms=50) * T / nr
        ms = bench_ms(lambda: sparse_mla_prefill(q, kv, idx, 0.1352, config=cfg))
        used = {**(sm_ops.PREFILL_CFG if h > 32 else sm_ops.PREFILL_CFG_FEW_HEADS), **(cfg or {})}
        rows.append(_row("sparse_mla_prefill", f"T={T} h={h} topk={K} S={CTX} bf16", ms, ceilings,
                         tflops=flop / ms / 1e9, ref_ms=ref, extrapolated_200k_ms=ms * CTX / T, cfg=str(used)))
        print(rows[-1])
        del q
        torch.cuda.empty_cache()
    return rows


def _decode_ref(q, cache, idx, scale, fmt):
    flat = cache.reshape(-1, cache.shape[-1])
    g = flat[idx.long()]
    g = dequant_latent_fp8_reference(g) if fmt == "fp8" else g.float()
    s = torch.einsum("bhd,bkd->bhk", q.float(), g) * scale
    return torch.einsum("bhk,bkd->bhd", torch.softmax(s, -1), g[..., :512]).to(q.dtype)


def _dequant_only_ms(cache, idx, dtype):
    """The gather-dequant launch of the FP8 decode alone (graph replay)."""
    from indexcache.kernels.sparse_mla import triton as tm
    B, k = idx.shape
    n = B * k
    flat = cache.reshape(-1, cache.shape[-1])
    rows = torch.empty(n, 576, device="cuda", dtype=dtype)
    idx2 = torch.empty(B, k, device="cuda", dtype=torch.int32)
    return _graph_ms(lambda: sm_ops._gather_dequant(tm, flat, idx, rows, idx2, sm_ops.DECODE_CFG["fp8"]))


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
                shape = f"B={B} h={h} topk={K} {fmt} cache"
                try:
                    ws = None
                    if fmt == "fp8":   # fixed workspace, as a CUDA-graph caller would pass it
                        ws = torch.empty(sparse_mla_decode_workspace_bytes(B, h, K, dtype=q.dtype, kv_format=fmt),
                                         dtype=torch.uint8, device="cuda")
                    fn = lambda: sparse_mla_decode(q, cache, idx, 0.1352, kv_format=fmt, workspace=ws)  # noqa: E731
                    ms = _graph_ms(fn)
                    eager = bench_ms(fn)
                    extra = {"dequant_us": _dequant_only_ms(cache, idx, q.dtype) * 1e3} if fmt == "fp8" else {}
                    rows.append(_row("sparse_mla_decode", shape, ms, ceilings, tbps=nbytes / ms / 1e9, ref_ms=ref,
                                     us=ms * 1e3, eager_ms=eager, tflops_equiv=flop / ms / 1e9,
                                     cfg=str(sm_ops.DECODE_CFG[fmt]), **extra))
                except Exception as e:  # one case failing must not hide the others
                    import traceback
                    traceback.print_exc()
                    rows.append({"name": "sparse_mla_decode", "shape": shape, "error": repr(e)[:300]})
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
