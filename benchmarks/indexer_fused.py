"""The two prefill top-k paths of the indexer (fused logits + candidate filter, two-pass logits + select) in one
run: their exactness, and the crossover table that sets ``ops.FUSED_MIN_CONTEXT_*`` (``choose_prefill_path``).

    python -m benchmarks.indexer_fused [--budget-s 210]
    python -m benchmarks.indexer_fused --candidates [--budget-s 170]   # the candidates kernel, ~1 min
    python -m benchmarks.indexer_fused --steps [--workspace-gb 4] [--step-rows 16384]   # per engine step

``--steps`` times one engine prefill step per context S (the last 16384 query rows of a causal prefill of S
keys, both paths with benchmarks.e2e's 4-GiB workspace, their index sets compared) from 100K to 1M, H=32 and 64,
and prints the constants that table implies: ``choose_prefill_path`` decides per call, i.e. per step, so a
whole prefill's crossover (below) counts every step under S and places the switch too late. The longest step's
fused run is also profiled per kernel (its rows: "profile fused step 1000000 H=..").

``--candidates`` runs only ``compare_candidates``: the fused candidates kernel alone (thresholds of a real fused
run) at its default launch config and two others, on the last rows of 200K and 1M (H=32; the default also at 1M
H=64), their TFLOP/s as a fraction of the same-run cuBLAS fp8, each other config checked against the default
(same counts, same lists as sets); the whole fused stage against the two-pass path at 200K (causal) and 1M
(sampled rows, extrapolated by pairs), H=32, their index sets compared; a few launch configs of the two-pass
path's logits kernel (same logits as its default). Without it:

1. Same-run ceilings (cuBLAS fp8 / bf16 8192^3, copy).
2. Exactness: index sets of the fused path equal the two-pass path's on the same logits (on Hopper both run the
   Gluon kernel's tile code: the filter is its epilogue), row by row, on random data at
   32K (H=32 and 64) and on tie-heavy data (every n-th key a copy of one key, so the k-th score of many rows is
   tied hundreds or thousands of times) at 32K and 200K.
3. Crossover: the whole indexer stage of one F layer, both paths (called directly, bypassing
   ``choose_prefill_path``), H=32 (GLM) and H=64 (V3.2), at 200K (full causal prefill, plus the logits-only
   floor: no-op select), 400K and 1M (evenly spaced blocks of query rows of the causal prefill, their full
   windows; the stage time is extrapolated by the ratio of (query, key) pairs, i.e. by the FLOPs); then 300K and
   600K if the time box allows. Each is checked (the timed outputs' index sets must be equal). On Hopper the
   fused path is also timed with the Triton filter (the kernel the Gluon filter replaced), in the same run.
4. A per-kernel profile of one fused run (200K H=32) and the fused kernel alone (last 8192 rows of 200K,
   thresholds of a real run) at a few launch configs, H=32 and H=64 (the first config is the default).
Every case is time-boxed and wrapped in try/except (an error is printed and recorded, the run goes on). Tables are
printed last, the crossover table (with the constants it implies) at the very end; JSON is written to
benchmarks/results/indexer_fused.json and $OUT.
"""
from __future__ import annotations

import argparse
import tempfile
import time
import traceback

import torch

from benchmarks.common import measure_ceilings, run_metadata, table, write_results
from indexcache.kernels import indexer as ix

DEV = "cuda"
TOPK = 2048
# problem sizes; "tiny" is a CPU dry run of the script logic (TRITON_INTERPRET=1, --tiny)
SIZES = {
    "full": dict(warm=(12288, 4096), small=32768, big=200_000, ties_rows=8192, blocks=16, per=2048,
                 sampled=(400_000, 1 << 20), extra=(300_000, 600_000),
                 steps=(100_000, 150_000, 200_000, 250_000, 300_000, 400_000, 600_000, 1_000_000), step_rows=16384),
    "tiny": dict(warm=(200, 64), small=150, big=300, ties_rows=50, blocks=2, per=24, sampled=(450, 600),
                 extra=(350,), steps=(200, 300, 450), step_rows=96),
}
WORKSPACE = 2 << 30  # both paths' workspace_bytes (the functions' default; --steps passes its own)
SZ = SIZES["full"]
T0 = time.perf_counter()
BUDGET_S = 210.0


def left() -> float:
    return BUDGET_S - (time.perf_counter() - T0)


def case(rows: list, name: str, need_s: float, fn):
    """Run ``fn(rows)`` if the time box leaves need_s seconds; record a skip or the error instead of failing."""
    if left() < need_s:
        rows.append({"name": name, "skipped": f"time box: {left():.0f} s left, needs ~{need_s:.0f} s"})
        print(f"[skip] {name}", flush=True)
        return
    t = time.perf_counter()
    try:
        fn(rows)
    except Exception as e:  # noqa: BLE001 - one failing case must not lose the others
        traceback.print_exc()
        rows.append({"name": name, "error": repr(e)[:300]})
    print(f"[{time.perf_counter() - t:6.1f} s] {name}  ({left():.0f} s left)", flush=True)
    torch.cuda.empty_cache()


def inputs(pos, s, h, seed, ties=0):
    """Query rows at absolute positions ``pos`` of a causal prefill of s keys (window [0, pos+1)); ``ties``: every
    ties-th key is a copy of key 0 (one tied score per row, repeated s/ties times) and the weights are
    non-negative, so the copies rank high."""
    g = torch.Generator(device=DEV).manual_seed(seed)
    t = pos.numel()
    q = torch.randn(t, h, 128, device=DEV, dtype=torch.bfloat16, generator=g)
    w = torch.randn(t, h, device=DEV, dtype=torch.float32, generator=g)
    k = torch.randn(s, 128, device=DEV, dtype=torch.bfloat16, generator=g)
    if ties:
        k[::ties] = k[0].clone()
        w = w.abs()
    q8, wf = ix.quantize_indexer_q(q, w)
    del q
    k8, ks = ix.quantize_indexer_k(k)
    re = (pos + 1).to(torch.int32)
    rs = torch.zeros_like(re)
    return q8, wf, k8, ks, rs, re


def causal(s, h, seed, ties=0):
    return inputs(torch.arange(s, device=DEV), s, h, seed, ties)


def run(path, q8, w, k8, ks, rs, re, out, stats=None, logits_kernel=None, workspace=None):
    """One path, called directly (``choose_prefill_path`` is what this benchmark calibrates). ``logits_kernel``:
    the two-pass path's logits kernel, and the fused path's filter kernel (None: the production choice, Gluon on
    Hopper); path "fused (triton filter)": the fused path with the Triton filter. ``workspace``: both paths'
    workspace_bytes (None: ``WORKSPACE``)."""
    ws = workspace or WORKSPACE
    if path == "fused":
        return ix.indexer_topk_prefill_fused(q8, w, k8, ks, rs, re, TOPK, out=out, stats=stats,
                                             candidates_kernel=logits_kernel, workspace_bytes=ws)
    if path == "fused (triton filter)":
        return ix.indexer_topk_prefill_fused(q8, w, k8, ks, rs, re, TOPK, out=out, stats=stats,
                                             candidates_kernel="triton", workspace_bytes=ws)
    if path == "two-pass":
        return ix.indexer_topk_prefill_two_pass(q8, w, k8, ks, rs, re, TOPK, out=out, logits_kernel=logits_kernel,
                                                workspace_bytes=ws)
    noop = lambda lg, k, row_start=None, row_end=None: torch.empty(  # noqa: E731
        lg.shape[0], k, dtype=torch.int32, device=lg.device)
    return ix.indexer_topk_prefill_two_pass(q8, w, k8, ks, rs, re, TOPK, out=out, topk_fn=noop,
                                            logits_kernel=logits_kernel, workspace_bytes=ws)


def timed_s(fn, reps):
    """Median wall seconds of fn() (synchronised), and the peak extra memory of the calls in GiB."""
    ts = []
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    for _ in range(reps):
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        ts.append(time.perf_counter() - t)
    return sorted(ts)[len(ts) // 2], (torch.cuda.max_memory_allocated() - base) / 2**30


def rows_differ(a, b, block=16384):
    """Rows whose index sets differ (each row sorted; -1 padding included)."""
    n = 0
    for i in range(0, a.shape[0], block):
        n += int((a[i:i + block].sort(1).values != b[i:i + block].sort(1).values).any(1).sum())
    return n


def pairs(rs, re):
    return int((re.long() - rs.long()).clamp(min=0).sum())


def check(rows, label, h, data):
    q8, w, k8, ks, rs, re = data
    t = q8.shape[0]
    st = {}
    a = run("fused", q8, w, k8, ks, rs, re, torch.empty(t, TOPK, dtype=torch.int32, device=DEV), st)
    b = run("two-pass", q8, w, k8, ks, rs, re, torch.empty(t, TOPK, dtype=torch.int32, device=DEV))
    d = rows_differ(a, b)
    rows.append({"name": f"check {label}", "H": h, "rows": t, "rows_differ": d, "exact": d == 0,
                 "fallback_rows": st.get("fallback_rows"), "mean_candidates": st.get("mean_candidates"),
                 "recall": ix.topk_recall(a[-4096:], b[-4096:]) if d else 1.0})
    print(rows[-1], flush=True)


def stage(rows, ceil, label, h, data, scale=1.0, reps=3, floor=True):
    """Time the stage with both paths (the fused one also with the Triton filter where the production filter is
    the Gluon one; and the logits-only floor), compare the two production outputs (same scores bit for bit)."""
    q8, w, k8, ks, rs, re = data
    t = q8.shape[0]
    flops = 2 * pairs(rs, re) * h * 128
    outs, timed = {}, {}
    cap = tuple(torch.cuda.get_device_capability()) if DEV == "cuda" else None
    alt = ("fused (triton filter)",) if ix.prefill_logits_kernel(cap, h) != "triton" else ()
    for path in ("fused",) + alt + ("two-pass",) + (("logits only",) if floor else ()):
        out = torch.empty(t, TOPK, dtype=torch.int32, device=DEV)
        st = {}
        sec, peak = timed_s(lambda: run(path, q8, w, k8, ks, rs, re, out, st if "fused" in path else None), reps)
        r = {"name": f"{label} {path}", "H": h, "rows": t, "ms": sec * 1e3, "stage_s": sec * scale,
             "tflops": flops / sec / 1e12, "frac_fp8_cublas": flops / sec / 1e12 / ceil["fp8_matmul_tflops"],
             "peak_extra_gib": peak}
        if "fused" in path:
            r.update(fallback_rows=st.get("fallback_rows"), mean_candidates=st.get("mean_candidates"),
                     chunks=st.get("chunks"), sample_chunks=st.get("sample_chunks"), cap=st.get("cap"))
        rows.append(r)
        timed[path] = r
        print(r, flush=True)
        if path != "logits only":
            outs[path] = out
    d = rows_differ(outs["fused"], outs["two-pass"])
    rows.append({"name": f"check {label} (timed outputs)", "H": h, "rows": t, "rows_differ": d, "exact": d == 0})
    print(rows[-1], flush=True)
    fu, tw = timed["fused"], timed["two-pass"]
    rows.append({"name": f"{label} speedup fused vs two-pass", "H": h, "ratio": tw["ms"] / fu["ms"]})
    if alt:
        rows.append({"name": f"{label} speedup Gluon filter vs Triton filter", "H": h,
                     "ratio": timed[alt[0]]["ms"] / fu["ms"]})
    return {"fused_s": fu["stage_s"], "two_pass_s": tw["stage_s"], "exact": d == 0}


def profile_fused(rows, h, data, label="200K", workspace=None):
    """GPU time per kernel of one fused run (top 10; self CPU time per op in a CPU dry run)."""
    from torch.profiler import ProfilerActivity, profile

    q8, w, k8, ks, rs, re = data
    out = torch.empty(q8.shape[0], TOPK, dtype=torch.int32, device=DEV)
    gpu = DEV == "cuda"
    with profile(activities=[ProfilerActivity.CUDA if gpu else ProfilerActivity.CPU]) as prof:
        run("fused", q8, w, k8, ks, rs, re, out, workspace=workspace)
        if gpu:
            torch.cuda.synchronize()
    evs = []
    for e in prof.key_averages():
        us = ((getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)) if gpu
              else e.self_cpu_time_total)
        if us:
            evs.append((us, e.key, e.count))
    evs.sort(reverse=True)
    total = sum(us for us, _, _ in evs)
    for us, key, n in evs[:10]:
        rows.append({"name": f"profile fused {label} H={h}: {key[:60]}", "H": h, "ms": us / 1e3, "calls": n,
                     "share": us / max(total, 1)})


def _tiny():
    """Tiny sizes on CPU: checks the script's logic, not the kernels' speed (ceilings and memory are dummies)."""
    global DEV, TOPK, SZ
    DEV, TOPK, SZ = "cpu", 16, SIZES["tiny"]
    for name in ("synchronize", "reset_peak_memory_stats", "empty_cache"):
        setattr(torch.cuda, name, lambda *a, **k: None)
    torch.cuda.memory_allocated = torch.cuda.max_memory_allocated = lambda *a, **k: 0
    globals()["measure_ceilings"] = lambda: {"fp8_matmul_tflops": 1.0, "bf16_matmul_tflops": 1.0, "copy_tbps": 1.0}
    import benchmarks.common as common

    common.bench_ms = lambda fn, **kw: timed_s(fn, 1)[0] * 1e3
    from indexcache.kernels.indexer import ops  # the Triton top-k is far too slow in the interpreter
    from indexcache.kernels.topk.reference import topk_rows_reference
    ops.default_topk_fn = lambda: topk_rows_reference


SWEEP = {  # (BQ, BKV, num_warps, num_stages); the first is triton.candidates_config's default
    32: ((4, 128, 4, 3), (8, 64, 4, 3), (2, 128, 4, 3), (4, 64, 4, 3), (4, 128, 8, 3), (8, 128, 8, 3)),
    64: ((2, 128, 4, 3), (4, 64, 8, 3), (1, 128, 4, 3), (2, 64, 4, 3), (2, 128, 8, 3), (4, 128, 8, 3)),
}


def sweep_candidates(rows, ceil, h, data):
    """The fused kernel alone (thresholds of a real run) on the last rows of the stage, a few launch configs."""
    from benchmarks.common import bench_ms

    q8, w, k8, ks, rs, re = data
    st = {}
    run("fused", q8, w, k8, ks, rs, re, torch.empty(q8.shape[0], TOPK, dtype=torch.int32, device=DEV), st)
    n = min(8192, q8.shape[0])
    sl = slice(q8.shape[0] - n, q8.shape[0])
    cap = st["cap"]
    bufs = (torch.empty(n, cap, device=DEV), torch.empty(n, cap, dtype=torch.int32, device=DEV),
            torch.empty(n, 2, dtype=torch.int32, device=DEV))
    flops = 2 * pairs(rs[sl], re[sl]) * h * 128
    for bq, bkv, nw, ns in SWEEP[h]:
        cfg = dict(BQ=bq, BKV=bkv, num_warps=nw, num_stages=ns)
        try:
            ms = bench_ms(lambda: ix.indexer_prefill_candidates(q8[sl], w[sl], k8, ks, rs[sl], re[sl], st["thr"][sl],
                                                                cap, out=bufs, config=cfg), warmup_ms=10, rep_ms=50)
            rows.append({"name": f"sweep fused kernel H={h} {cfg}", "H": h, "rows": n, "ms": ms,
                         "tflops": flops / ms / 1e9, "frac_fp8_cublas": flops / ms / 1e9 / ceil["fp8_matmul_tflops"]})
        except Exception as e:  # noqa: BLE001 - a config that does not compile is reported
            rows.append({"name": f"sweep fused kernel H={h} {cfg}", "error": repr(e)[:200]})
        print(rows[-1], flush=True)


def print_limits(limits: dict, what: str) -> None:
    """The ``ops.FUSED_MIN_CONTEXT_*`` constants that a crossover table's ``limits`` imply."""
    for h, name in ((32, "FUSED_MIN_CONTEXT_UP_TO_32_HEADS"), (64, "FUSED_MIN_CONTEXT_OVER_32_HEADS")):
        c = limits.get(h)
        print(f"{name} = {c if c is not None else 'none measured (two-pass wins at the largest context)'}"
              f"   # H={h}: {what}fused faster at every measured context >= this")


def crossover_rows(cross: dict, label: str = "crossover") -> tuple[list[dict], dict]:
    """The crossover table, and per head group the smallest measured context from which the fused path wins at
    every larger measured context (None: two-pass wins at the largest one)."""
    out, limits = [], {}
    for h in (32, 64):
        ctxs = sorted(c for hh, c in cross if hh == h)
        limit = None
        for c in reversed(ctxs):
            r = cross[(h, c)]
            if r["fused_s"] >= r["two_pass_s"]:
                break
            limit = c
        limits[h] = limit
        for c in ctxs:
            r = cross[(h, c)]
            out.append({"name": f"{label} H={h} ctx {c}", "H": h, "ctx": c, "fused_s": r["fused_s"],
                        "two_pass_s": r["two_pass_s"], "speedup": r["two_pass_s"] / r["fused_s"],
                        "faster": "fused" if r["fused_s"] < r["two_pass_s"] else "two_pass", "exact": r["exact"]})
    return out, limits


CAND_CONFIGS = (  # (label, candidates config); the first is the default (triton.candidates_config)
    ("default", {}),
    ("BQ4 BKV64 4w", {"BQ": 4, "BKV": 64, "num_warps": 4, "num_stages": 3}),
    ("BQ8 BKV64 8w", {"BQ": 8, "BKV": 64, "num_warps": 8, "num_stages": 3}),
)
LOGITS_CONFIGS = ((8, 64, 4, 3), (8, 128, 8, 3), (4, 64, 4, 3))  # (BQ, BKV, warps, stages); first = default


def _same_lists(a, b, cap):
    """Rows whose kept candidate columns differ as sets (rows that overflowed cap are skipped: which candidates
    they keep is up to the kernel), and whether the counts are equal."""
    n = a[2][:, 0].clamp(max=cap)
    ar = torch.arange(cap, device=n.device)[None, :] < n[:, None]
    ok = a[2][:, 0] <= cap
    ca = torch.where(ar, a[1], 2**31 - 1).sort(1).values
    cb = torch.where(ar, b[1], 2**31 - 1).sort(1).values
    return int((ca != cb).any(1)[ok].sum()), bool(torch.equal(a[2], b[2]))


def candidates_alone(rows, ceil, label, h, data, configs, kernel="triton"):
    """The candidates kernel ``kernel`` alone on these rows (thresholds of a real fused run), each config; every
    config after the first is checked against the first (the default)."""
    from benchmarks.common import bench_ms

    q8, w, k8, ks, rs, re = data
    st = {}
    run("fused", q8, w, k8, ks, rs, re, torch.empty(q8.shape[0], TOPK, dtype=torch.int32, device=DEV), st)
    t, cap, thr = q8.shape[0], st["cap"], st["thr"]
    flops = 2 * pairs(rs, re) * h * 128
    outs, default = {}, configs[0][0]
    for name, cfg in configs:
        bufs = (torch.empty(t, cap, device=DEV), torch.empty(t, cap, dtype=torch.int32, device=DEV),
                torch.empty(t, 2, dtype=torch.int32, device=DEV))
        fn = lambda: ix.indexer_prefill_candidates(q8, w, k8, ks, rs, re, thr, cap, out=bufs, config=cfg,  # noqa
                                                   kernel=kernel)
        try:
            ms = bench_ms(fn, warmup_ms=10, rep_ms=60)
            fn()
            outs[name] = bufs
            r = {"name": f"{label} kernel {name}", "H": h, "rows": t, "ms": ms, "tflops": flops / ms / 1e9,
                 "frac_fp8_cublas": flops / ms / 1e9 / ceil["fp8_matmul_tflops"],
                 "mean_candidates": float(bufs[2][:, 0].float().mean())}
            if name != default and default in outs:
                r["rows_differ"], r["counts_equal"] = _same_lists(bufs, outs[default], cap)
                r["exact"] = r["rows_differ"] == 0 and r["counts_equal"]
        except Exception as e:  # noqa: BLE001 - a config that fails is reported, the others still run
            r = {"name": f"{label} kernel {name}", "error": repr(e)[:200]}
        rows.append(r)
        print(r, flush=True)


def fused_stage(rows, ceil, label, h, data, scale=1.0, reps=3):
    """The whole stage by the fused path and by the two-pass path; index sets compared."""
    q8, w, k8, ks, rs, re = data
    t = q8.shape[0]
    flops = 2 * pairs(rs, re) * h * 128
    outs = {}
    for name in ("fused", "two-pass"):
        out = torch.empty(t, TOPK, dtype=torch.int32, device=DEV)
        st = {}
        fn = lambda name=name, out=out, st=st: run(name, q8, w, k8, ks, rs, re, out,  # noqa: E731
                                                  st if name == "fused" else None)
        fn()
        sec, peak = timed_s(fn, reps)
        outs[name] = out
        r = {"name": f"{label} {name}", "H": h, "rows": t, "ms": sec * 1e3, "stage_s": sec * scale,
             "tflops": flops / sec / 1e12, "frac_fp8_cublas": flops / sec / 1e12 / ceil["fp8_matmul_tflops"],
             "peak_extra_gib": peak, "fallback_rows": st.get("fallback_rows"),
             "mean_candidates": st.get("mean_candidates")}
        rows.append(r)
        print(r, flush=True)
    d = rows_differ(outs["fused"], outs["two-pass"])
    rows.append({"name": f"check {label} fused vs two-pass", "H": h, "rows": t, "rows_differ": d, "exact": d == 0})
    print(rows[-1], flush=True)


def logits_configs(rows, ceil, label, h, data, configs=None, kernel="triton"):
    """The two-pass path's logits kernel alone (one chunk of these rows over all keys), a few launch configs:
    (name, config) pairs of ``kernel``'s keys, the first the default (others are compared with its logits);
    None: ``LOGITS_CONFIGS`` of the Triton kernel."""
    from benchmarks.common import bench_ms

    q8, w, k8, ks, rs, re = data
    t, s = q8.shape[0], k8.shape[0]
    out = torch.empty(t, s, device=DEV)
    flops = 2 * pairs(rs, re) * h * 128
    ref = None
    if configs is None:
        configs = [(str(c), c) for c in (dict(BQ=bq, BKV=bkv, num_warps=nw, num_stages=ns)
                                         for bq, bkv, nw, ns in LOGITS_CONFIGS)]
    for name, cfg in configs:
        try:
            ms = bench_ms(lambda: ix.indexer_logits(q8, w, k8, ks, rs, re, out=out, config=cfg, kernel=kernel),
                          warmup_ms=10, rep_ms=60)
            same = None
            if ref is None:
                ref = out.clone()
            else:
                same = bool(torch.equal(out, ref))
            r = {"name": f"{label} logits {name}", "H": h, "rows": t, "ms": ms, "tflops": flops / ms / 1e9,
                 "frac_fp8_cublas": flops / ms / 1e9 / ceil["fp8_matmul_tflops"], "same_as_default": same}
        except Exception as e:  # noqa: BLE001
            r = {"name": f"{label} logits {name}", "error": repr(e)[:200]}
        rows.append(r)
        print(r, flush=True)
    del out, ref


def compare_candidates(rows, ceil):
    big, one_m = SZ["big"], SZ["sampled"][-1]
    tail, tail_1m = SZ["warm"][1] * 2, SZ["warm"][1] // 2

    def warm(rows):  # compile every kernel and config below before anything is timed
        t = time.perf_counter()
        s, n = SZ["warm"]
        data = inputs(torch.arange(s - n, s, device=DEV), s, 32, seed=9)
        candidates_alone([], ceil, "warm", 32, data, CAND_CONFIGS)
        fused_stage([], ceil, "warm", 32, data, reps=1)
        logits_configs([], ceil, "warm", 32, data)
        torch.cuda.synchronize()
        rows.append({"name": "warm-up (compiles)", "ms": (time.perf_counter() - t) * 1e3})

    case(rows, "warm-up", 60, warm)
    case(rows, "kernel 200K", 15, lambda rows: candidates_alone(
        rows, ceil, f"{big} last {tail} rows", 32, inputs(torch.arange(big - tail, big, device=DEV), big, 32, 11),
        CAND_CONFIGS))
    case(rows, "kernel 1M", 15, lambda rows: candidates_alone(
        rows, ceil, f"{one_m} last {tail_1m} rows", 32,
        inputs(torch.arange(one_m - tail_1m, one_m, device=DEV), one_m, 32, 12), CAND_CONFIGS))
    case(rows, "stage 200K", 25, lambda rows: fused_stage(rows, ceil, f"{big} stage", 32, causal(big, 32, 32)))

    def sampled_1m(rows):
        blocks, per = SZ["blocks"], SZ["per"]
        starts = torch.linspace(0, one_m - per, blocks, device=DEV).long()
        pos = (starts[:, None] + torch.arange(per, device=DEV)[None, :]).flatten()
        data = inputs(pos, one_m, 32, seed=7)
        scale = (one_m * (one_m + 1) / 2) / pairs(data[4], data[5])
        rows.append({"name": f"{one_m} sample", "H": 32, "rows": pos.numel(),
                     "extrapolation": f"x{scale:.1f} by pairs"})
        fused_stage(rows, ceil, f"{one_m} stage (sampled rows)", 32, data, scale=scale)

    case(rows, "stage 1M", 25, sampled_1m)
    case(rows, "logits configs 200K", 10, lambda rows: logits_configs(
        rows, ceil, f"{big} last {tail} rows", 32, inputs(torch.arange(big - tail, big, device=DEV), big, 32, 13)))
    case(rows, "kernel 1M H=64", 25, lambda rows: candidates_alone(
        rows, ceil, f"{one_m} last {tail_1m} rows", 64,
        inputs(torch.arange(one_m - tail_1m, one_m, device=DEV), one_m, 64, 14), CAND_CONFIGS[:1]))


def main():
    global BUDGET_S
    ap = argparse.ArgumentParser()
    ap.add_argument("--budget-s", type=float, default=None, help="time box for the whole run (cases past it "
                                                                 "are skipped and recorded as such; default "
                                                                 "210 s, 170 s with --candidates)")
    ap.add_argument("--tiny", action="store_true", help="CPU dry run of the script logic (interpreter, k=16)")
    ap.add_argument("--candidates", action="store_true", help="only the candidates kernel (launch configs) and the "
                                                              "fused stage vs two-pass, 200K and 1M")
    ap.add_argument("--steps", action="store_true", help="only one engine prefill step per context, both paths "
                                                         "(what choose_prefill_path decides)")
    ap.add_argument("--step-rows", type=int, default=None, help="--steps: query rows a step (default 16384, "
                                                                "benchmarks.e2e's --chunk)")
    ap.add_argument("--workspace-gb", type=int, default=4, help="--steps: workspace of both paths, GiB (default 4, "
                                                                "benchmarks.e2e's)")
    args = ap.parse_args()
    BUDGET_S = args.budget_s or (170.0 if args.candidates else BUDGET_S)
    if args.tiny:
        _tiny()
    if args.candidates:
        return main_candidates(args)
    if args.steps:
        return main_steps(args)
    rows: list[dict] = []
    ceil = ceilings_case(rows)

    def warm(rows):  # compile every kernel both paths use (both head counts) before anything is timed
        t = time.perf_counter()
        s, n = SZ["warm"]
        for h in (32, 64):
            data = inputs(torch.arange(s - n, s, device=DEV), s, h, seed=9)
            for path in ("fused", "two-pass", "logits only"):
                run(path, *data, torch.empty(n, TOPK, dtype=torch.int32, device=DEV))
            run("fused", *[x[:40] if x.shape[0] == n else x for x in data],
                torch.empty(40, TOPK, dtype=torch.int32, device=DEV))  # <= 64 rows: the top-k decode path
        torch.cuda.synchronize()
        rows.append({"name": "warm-up (compiles)", "ms": (time.perf_counter() - t) * 1e3})

    case(rows, "warm-up", 30, warm)
    sm, big, tr = SZ["small"], SZ["big"], SZ["ties_rows"]
    case(rows, "check 32K H=32", 10, lambda rows: check(rows, f"{sm} causal seed 0", 32, causal(sm, 32, 0)))
    case(rows, "check 32K H=64", 10, lambda rows: check(rows, f"{sm} causal seed 3", 64, causal(sm, 64, 3)))
    for every in (16, 4000):
        case(rows, f"check 32K ties every {every}", 15, lambda rows, e=every: check(
            rows, f"{sm} causal ties every {e}th key", 32, causal(sm, 32, 4, ties=e)))
    case(rows, "check 200K ties", 10, lambda rows: check(
        rows, f"{big} last {tr} rows, ties every 64th key", 32,
        inputs(torch.arange(big - tr, big, device=DEV), big, 32, 6, ties=64)))

    cross = {}  # (H, ctx) -> {"fused_s", "two_pass_s", "exact"}

    def full(rows, h):
        cross[(h, big)] = stage(rows, ceil, f"{big} stage", h, causal(big, h, h))

    def sampled(rows, s, h):
        blocks, per = SZ["blocks"], SZ["per"]
        starts = torch.linspace(0, s - per, blocks, device=DEV).long()
        pos = (starts[:, None] + torch.arange(per, device=DEV)[None, :]).flatten()
        data = inputs(pos, s, h, seed=7)
        scale = (s * (s + 1) / 2) / pairs(data[4], data[5])
        rows.append({"name": f"{s} sample", "H": h, "rows": pos.numel(), "extrapolation": f"x{scale:.1f} by pairs",
                     "note": f"{blocks} evenly spaced blocks of {per} query rows of a causal prefill of {s}"})
        cross[(h, s)] = stage(rows, ceil, f"{s} stage (sampled rows)", h, data, scale=scale, floor=False)

    for h in (32, 64):
        case(rows, f"{big} H={h}", 25, lambda rows, h=h: full(rows, h))
    for s in SZ["sampled"]:
        for h in (32, 64):
            case(rows, f"{s} H={h}", 30, lambda rows, s=s, h=h: sampled(rows, s, h))
    case(rows, "profile fused 200K H=32", 10, lambda rows: profile_fused(rows, 32, causal(big, 32, 32)))
    for h in (32, 64):
        case(rows, f"sweep fused kernel 200K H={h}", 40, lambda rows, h=h: sweep_candidates(
            rows, ceil, h, causal(big, h, 8)))
    for s in SZ["extra"]:  # finer crossover, if time is left
        for h in (32, 64):
            case(rows, f"{s} H={h}", 40, lambda rows, s=s, h=h: sampled(rows, s, h))
    cross_rows, limits = crossover_rows(cross)
    rows += cross_rows

    cols = ["name", "H", "rows", "ms", "stage_s", "tflops", "frac_fp8_cublas", "peak_extra_gib", "fallback_rows",
            "mean_candidates", "rows_differ", "ratio", "share", "error", "skipped"]
    write_results("indexer_fused", {"meta": run_metadata(), "ceilings": ceil, "topk": TOPK, "rows": rows,
                                    "fused_min_context": {str(h): c for h, c in limits.items()}},
                  [tempfile.gettempdir()] if args.tiny else None)  # a dry run leaves benchmarks/results alone
    print(f"total {time.perf_counter() - T0:.0f} s")
    short = [dict(r, error=r["error"][:60]) if "error" in r else r for r in rows]
    print(table([r for r in short if not r["name"].startswith(("profile", "crossover"))], cols))
    print(table([r for r in rows if r["name"].startswith("profile")], ["name", "ms", "calls", "share"]))
    print(table(cross_rows, ["name", "H", "ctx", "fused_s", "two_pass_s", "speedup", "faster", "exact"]))
    print_limits(limits, "")


def main_steps(args):
    """One engine prefill step per context S: the last step-rows query rows of a causal prefill of S keys, both
    paths with the e2e engine's workspace, their index sets compared. ``choose_prefill_path`` decides per call,
    i.e. per step, so this table (not the whole-stage one, which sums every step below S) sets its constants."""
    if args.workspace_gb < 1 or (args.step_rows is not None and args.step_rows < 1):
        raise SystemExit(f"indexer_fused: --workspace-gb and --step-rows must be >= 1, got {args.workspace_gb}, "
                         f"{args.step_rows}")
    ws = (args.workspace_gb << 30) if not args.tiny else 1 << 20
    n_rows = args.step_rows or SZ["step_rows"]
    rows: list[dict] = []
    ceil = ceilings_case(rows)
    steps = {}  # (H, S) -> {"fused_s", "two_pass_s", "exact"}

    def step(rows, h, s):
        n = min(n_rows, s)
        q8, w, k8, ks, rs, re = inputs(torch.arange(s - n, s, device=DEV), s, h, seed=h + s % 97)
        flops = 2 * pairs(rs, re) * h * 128
        outs, secs = {}, {}
        for path in ("fused", "two-pass"):
            outs[path] = torch.empty(n, TOPK, dtype=torch.int32, device=DEV)
            run(path, q8, w, k8, ks, rs, re, outs[path], workspace=ws)  # compiles this shape's specialisations
            secs[path], peak = timed_s(lambda: run(path, q8, w, k8, ks, rs, re, outs[path], workspace=ws), 3)
            rows.append({"name": f"step {s} H={h} {path}", "H": h, "rows": n, "ms": secs[path] * 1e3,
                         "tflops": flops / secs[path] / 1e12,
                         "frac_fp8_cublas": flops / secs[path] / 1e12 / ceil["fp8_matmul_tflops"],
                         "peak_extra_gib": peak})
            print(rows[-1], flush=True)
        d = rows_differ(outs["fused"], outs["two-pass"])
        steps[(h, s)] = {"fused_s": secs["fused"], "two_pass_s": secs["two-pass"], "exact": d == 0}
        if s == max(SZ["steps"]):  # where the fused path's time goes, per kernel, at the longest step
            profile_fused(rows, h, (q8, w, k8, ks, rs, re), f"step {s}", workspace=ws)

    for h in (32, 64):
        for s in SZ["steps"]:
            case(rows, f"step {s} H={h}", 20, lambda rows, h=h, s=s: step(rows, h, s))
    step_rows, limits = crossover_rows(steps, "step")
    rows += step_rows
    write_results("indexer_fused_steps", {"meta": run_metadata(), "ceilings": ceil, "topk": TOPK,
                                          "workspace_bytes": ws, "step_rows": n_rows, "rows": rows,
                                          "fused_min_context": {str(h): c for h, c in limits.items()}},
                  [tempfile.gettempdir()] if args.tiny else None)
    print(table([r for r in rows if not r["name"].startswith("step ") or "ms" in r],
                ["name", "rows", "ms", "calls", "share", "tflops", "frac_fp8_cublas", "peak_extra_gib", "error",
                 "skipped"]))
    print(table(step_rows, ["name", "H", "ctx", "fused_s", "two_pass_s", "speedup", "faster", "exact"]))
    print_limits(limits, f"one step of {n_rows} rows, ")


def ceilings_case(rows: list[dict]) -> dict:
    """Same-run ceilings as the first time-boxed case (NaN fp8 ceiling if it fails or is skipped)."""
    ceil = {"fp8_matmul_tflops": float("nan")}

    def ceilings(rows):
        ceil.update(measure_ceilings())
        print("ceilings:", ceil, flush=True)

    case(rows, "ceilings", 20, ceilings)
    return ceil


def main_candidates(args):
    rows: list[dict] = []
    ceil = ceilings_case(rows)
    compare_candidates(rows, ceil)
    write_results("indexer_candidates", {"meta": run_metadata(), "ceilings": ceil, "topk": TOPK, "rows": rows},
                  [tempfile.gettempdir()] if args.tiny else None)
    print(f"total {time.perf_counter() - T0:.0f} s")
    cols = ["name", "H", "rows", "ms", "stage_s", "tflops", "frac_fp8_cublas", "fallback_rows", "mean_candidates",
            "rows_differ", "exact", "same_as_default", "error", "skipped"]
    print(table([dict(r, error=r["error"][:60]) if "error" in r else r for r in rows], cols))


if __name__ == "__main__":
    main()
