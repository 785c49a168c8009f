"""The Gluon prefill indexer logits kernel (ping-pong schedule, kernels/indexer/gluon.py) against the Triton one,
checked and timed in one run on an H200, with the same-run cuBLAS fp8 ceiling.

    python -m benchmarks.indexer_logits_gluon             # about 1 min on an H200 (compiles included); JSON to $OUT
    python -m benchmarks.indexer_logits_gluon --diagnose  # why the Gluon kernel is where it is (about 1 min)

Shapes: the last 8192 query rows of a causal 200K prefill and the last 2048 rows of a causal 1M one (windows
[0, pos + 1): what the two-pass prefill's logits chunks compute), at 32 and 64 indexer heads. FLOPs are
2 * H * 128 per (row, key) pair inside the windows. Per shape: the Triton kernel, then the Gluon kernel: time,
TFLOP/s, fraction of cuBLAS fp8, the Gluon kernel's speedup, the largest difference from the Triton logits
(relative to the largest |logit|), whether the -inf pattern matches, unwritten (NaN) logits of a poisoned output,
and the error of both kernels against the PyTorch reference on 32 sampled rows. A kernel that fails to compile or
launch becomes a row with its error. Prints a table last, then a CHECK line (with the kernel the two-pass prefill
picks on this device, ``prefill_logits_kernel``).

``--diagnose`` (200K last 8192 rows, 32 and 64 heads) times the Gluon kernel's diagnostic modes (gluon.config_for:
``epilogue`` / ``mma`` / ``loads`` "none"; their outputs are not logits, only checked to be fully written) beside
the full kernel and the Triton one. It prints per row ms and fraction of cuBLAS fp8 (the full problem's FLOPs
over the row's time), then per head count the split: MMA-only = epilogue none (MMA + loads + stores + syncs),
epilogue-only = mma none (epilogue + loads + stores + syncs), skeleton = both none; serial = MMA-only +
epilogue-only - skeleton (the time if nothing overlapped), bound = max(MMA-only, epilogue-only) (perfect
overlap), overlap = (serial - full) / (serial - bound): 1 is perfect overlap, 0 is the two added up.
mma_no_loads = epilogue and loads none (the MMA rate with key tiles from one stage), loads_cost = full - loads
none; store_floor = the logits written once at the copy rate; cublas_time = the FLOPs at cuBLAS's rate. Each row
also has the median SM clock (sm_mhz) and board power (power_w) while it runs back to back for a second
(``nvidia-smi``, read only), and a first row gives them for the cuBLAS fp8 ceiling itself. Then one DIAG line per
head count, and a CHECK line.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import (bench_ms, clocks_during, fp8_matmul, measure_ceilings, run_metadata,  # noqa: E402
                               table, write_results)
from indexcache.kernels.indexer import (indexer_logits, prefill_logits_kernel, quantize_indexer_k,  # noqa: E402
                                        quantize_indexer_q)
from indexcache.kernels.indexer.reference import indexer_logits_ref  # noqa: E402

SHAPES = [(200_000, 8192, 32), (200_000, 8192, 64), (1 << 20, 2048, 32), (1 << 20, 2048, 64)]
SAMPLE_ROWS = 32


def _inputs(s, t, h, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q8, w = quantize_indexer_q(torch.randn(t, h, 128, device="cuda", dtype=torch.bfloat16, generator=g),
                               torch.randn(t, h, device="cuda", generator=g), hadamard=True)
    k8, ks = quantize_indexer_k(torch.randn(s, 128, device="cuda", dtype=torch.bfloat16, generator=g), hadamard=True)
    re = torch.arange(s - t, s, device="cuda", dtype=torch.int32) + 1
    return q8, w, k8, ks, torch.zeros_like(re), re


def _ref_err(out, sample, ref_rows):
    sub, rfin = out[sample], torch.isfinite(ref_rows)
    return float((sub[rfin] - ref_rows[rfin]).abs().max() / ref_rows[rfin].abs().max())


def run_shape(s, t, h, ceil_fp8, seed=0):
    q8, w, k8, ks, rs, re = _inputs(s, t, h, seed)
    flops = 2.0 * h * 128 * float((re - rs).clamp(min=0).sum())
    name = f"{s // 1000}K last {t}" if s < 1 << 20 else f"1M last {t}"
    base = {"shape": name, "H": h}
    sample = torch.randperm(t, device="cuda")[:SAMPLE_ROWS].sort().values
    ref_rows = indexer_logits_ref(q8[sample], w[sample], k8, ks, rs[sample], re[sample])
    tri = torch.full((t, s), float("nan"), device="cuda")
    indexer_logits(q8, w, k8, ks, rs, re, out=tri, kernel="triton")
    ms = bench_ms(lambda: indexer_logits(q8, w, k8, ks, rs, re, out=tri, kernel="triton"), warmup_ms=10, rep_ms=80)
    rows = [{**base, "kernel": "triton", "ms": ms, "tflops": flops / ms / 1e9,
             "of_cublas_fp8": flops / ms / 1e9 / ceil_fp8, "nan": int(tri.isnan().sum()),
             "ref_err": _ref_err(tri, sample, ref_rows)}]
    out = torch.full_like(tri, float("nan"))
    row = {**base, "kernel": "gluon"}
    try:
        indexer_logits(q8, w, k8, ks, rs, re, out=out, kernel="gluon")
        torch.cuda.synchronize()
        fin = torch.isfinite(tri)
        check = {"max_diff_vs_triton": float(torch.where(fin, out - tri, 0).abs().max() / tri[fin].abs().max()),
                 "inf_pattern_ok": bool(torch.equal(fin, torch.isfinite(out))), "nan": int(out.isnan().sum()),
                 "ref_err": _ref_err(out, sample, ref_rows)}
        ms = bench_ms(lambda: indexer_logits(q8, w, k8, ks, rs, re, out=out, kernel="gluon"), warmup_ms=10,
                      rep_ms=80)
        rows.append({**row, "ms": ms, "tflops": flops / ms / 1e9, "of_cublas_fp8": flops / ms / 1e9 / ceil_fp8,
                     "speedup": rows[0]["ms"] / ms, **check})
    except Exception as e:  # noqa: BLE001 - a kernel that does not build or run is a row
        rows.append({**row, "error": f"{type(e).__name__}: {str(e)[:200]}"})
    del tri, out, q8, k8
    torch.cuda.empty_cache()
    return rows


# (label, diagnostic modes) timed by --diagnose
DIAG_MODES = [("full", {}), ("epilogue none", {"epilogue": "none"}), ("mma none", {"mma": "none"}),
              ("loads none", {"loads": "none"}), ("epilogue+loads none", {"epilogue": "none", "loads": "none"}),
              ("mma+loads none", {"mma": "none", "loads": "none"}),
              ("skeleton (epilogue+mma none)", {"epilogue": "none", "mma": "none"})]


def _split(times: dict, flops: float, ceil_fp8: float) -> dict:
    """The implied split of the full time (see the module docstring)."""
    full, mma, epi, skel = (times.get(k) for k in ("full", "epilogue none", "mma none",
                                                    "skeleton (epilogue+mma none)"))
    if None in (full, mma, epi, skel):
        return {}
    serial, bound = mma + epi - skel, max(mma, epi)
    out = {"full_ms": full, "mma_only_ms": mma, "epilogue_only_ms": epi, "skeleton_ms": skel, "serial_ms": serial,
           "bound_ms": bound, "overlap": (serial - full) / (serial - bound) if serial > bound else float("nan"),
           "mma_only_of_cublas": flops / mma / 1e9 / ceil_fp8, "epilogue_only_of_cublas": flops / epi / 1e9 / ceil_fp8}
    if "epilogue+loads none" in times:
        out["mma_no_loads_of_cublas"] = flops / times["epilogue+loads none"] / 1e9 / ceil_fp8
    if "loads none" in times:
        out["loads_cost_ms"] = full - times["loads none"]
    return out


def diagnose_shape(s, t, h, ceilings):
    """--diagnose rows and split for one shape (see the module docstring)."""
    ceil_fp8 = ceilings["fp8_matmul_tflops"]
    q8, w, k8, ks, rs, re = _inputs(s, t, h, 0)
    flops = 2.0 * h * 128 * float((re - rs).clamp(min=0).sum())
    base = {"shape": f"{s // 1000}K last {t}", "H": h}
    store_ms = t * s * 4 / (ceilings["copy_tbps"] * 1e9)  # the logits written once at the copy rate
    tri = torch.empty(t, s, device="cuda")
    indexer_logits(q8, w, k8, ks, rs, re, out=tri, kernel="triton")
    ms = bench_ms(lambda: indexer_logits(q8, w, k8, ks, rs, re, out=tri, kernel="triton"), warmup_ms=10, rep_ms=60)
    rows = [{**base, "kernel": "triton", "mode": "full", "ms": ms, "of_cublas_fp8": flops / ms / 1e9 / ceil_fp8,
             **clocks_during(lambda: indexer_logits(q8, w, k8, ks, rs, re, out=tri, kernel="triton"))}]
    out = torch.empty_like(tri)
    times = {}
    for label, mode in DIAG_MODES:
        row = {**base, "kernel": "gluon", "mode": label}
        try:
            out.fill_(float("nan"))
            indexer_logits(q8, w, k8, ks, rs, re, out=out, config=mode, kernel="gluon")
            torch.cuda.synchronize()
            nan = int(out.isnan().sum())
            diff = None
            if not mode:
                fin = torch.isfinite(tri)
                diff = float(torch.where(fin, out - tri, 0).abs().max() / tri[fin].abs().max())
            ms = bench_ms(lambda: indexer_logits(q8, w, k8, ks, rs, re, out=out, config=mode, kernel="gluon"),
                          warmup_ms=10, rep_ms=60)
            clk = clocks_during(lambda: indexer_logits(q8, w, k8, ks, rs, re, out=out, config=mode, kernel="gluon"))
        except Exception as e:  # noqa: BLE001 - a mode that does not build or run is a row
            rows.append({**row, "error": f"{type(e).__name__}: {str(e)[:200]}"})
            continue
        times[label] = ms
        rows.append({**row, "ms": ms, "of_cublas_fp8": flops / ms / 1e9 / ceil_fp8, "nan": nan,
                     "max_diff_vs_triton": diff, **clk})
    split = _split(times, flops, ceil_fp8)
    splits = [{**base, "store_floor_ms": store_ms, "cublas_time_ms": flops / ceil_fp8 / 1e9, **split}] if split else []
    del tri, out, q8, k8
    torch.cuda.empty_cache()
    return rows, splits


def cublas_clocks() -> dict:
    """The clock and power of the fp8 ceiling itself (cuBLAS 8192^3, as ``measure_ceilings``), for comparison."""
    return {"shape": "8192^3", "kernel": "cublas fp8", "mode": "torch._scaled_mm",
            **clocks_during(fp8_matmul(8192))}


def diagnose(name: str) -> int:
    t0 = time.perf_counter()
    ceilings = measure_ceilings()
    rows, splits = [cublas_clocks()], []
    for s, t, h in SHAPES[:2]:
        r, sp = diagnose_shape(s, t, h, ceilings)
        rows += r
        splits += sp
        print(f"[{time.perf_counter() - t0:6.1f} s] {s} last {t} H={h}", flush=True)
    write_results(name, {"meta": run_metadata(), "ceilings": ceilings, "rows": rows, "splits": splits})
    print(f"ceilings: bf16 {ceilings['bf16_matmul_tflops']:.0f} TFLOP/s, fp8 {ceilings['fp8_matmul_tflops']:.0f} "
          f"(8192^3 torch._scaled_mm), copy {ceilings['copy_tbps']:.2f} TB/s; total {time.perf_counter() - t0:.0f} s")
    print(table(rows, ["shape", "H", "kernel", "mode", "ms", "of_cublas_fp8", "sm_mhz", "power_w", "nan",
                       "max_diff_vs_triton", "error"]))
    print(table(splits, ["H", "full_ms", "mma_only_ms", "epilogue_only_ms", "skeleton_ms", "serial_ms", "bound_ms",
                         "overlap", "mma_only_of_cublas", "mma_no_loads_of_cublas", "epilogue_only_of_cublas",
                         "loads_cost_ms", "store_floor_ms", "cublas_time_ms"]))
    bad = [r for r in rows if r.get("nan") or "error" in r or (r.get("max_diff_vs_triton") or 0) > 1e-4]
    for sp in splits:
        mma, ov = sp["mma_only_of_cublas"], sp["overlap"]
        no_loads = sp.get("mma_no_loads_of_cublas")
        why = ("the MMA itself is slow in this kernel (MMA-only below 0.85 of cuBLAS"
               + (f"; {no_loads:.2f} without key loads)" if no_loads else ")") if mma < 0.85 else
               "MMA and epilogue do not overlap (overlap below 0.5)" if ov < 0.5 else
               "the epilogue alone is as long as the MMA" if sp["epilogue_only_ms"] > 0.9 * sp["mma_only_ms"] else
               "overlap works; the rest is loads / stores / syncs (see skeleton and loads_cost)")
        print(f"DIAG H={sp['H']}: MMA-only {mma:.2f} of cuBLAS, overlap {ov:.2f} -> {why}")
    print("CHECK:", "all modes wrote every logit, full outputs match Triton within 1e-4" if not bad
          else f"{len(bad)} rows failed (see table)")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--name", default=None)
    ap.add_argument("--diagnose", action="store_true", help="time the Gluon kernel's diagnostic modes instead")
    args = ap.parse_args()
    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9:
        print("indexer_logits_gluon: needs a Hopper GPU (sm_90)")
        return 2
    if args.diagnose:
        return diagnose(args.name or "indexer_logits_gluon_diagnose")
    t0 = time.perf_counter()
    ceilings = measure_ceilings()
    fp8 = ceilings["fp8_matmul_tflops"]
    rows = []
    for s, t, h in SHAPES:
        rows += run_shape(s, t, h, fp8)
        print(f"[{time.perf_counter() - t0:6.1f} s] {s} last {t} H={h}", flush=True)
    cap = tuple(torch.cuda.get_device_capability())
    chosen = {h: prefill_logits_kernel(cap, h) for h in sorted({h for _, _, h in SHAPES})}
    write_results(args.name or "indexer_logits_gluon", {"meta": run_metadata(), "ceilings": ceilings, "rows": rows,
                                                        "prefill_logits_kernel": chosen})
    print(f"ceilings: bf16 {ceilings['bf16_matmul_tflops']:.0f} TFLOP/s, fp8 {fp8:.0f}, "
          f"copy {ceilings['copy_tbps']:.2f} TB/s; total {time.perf_counter() - t0:.0f} s")
    print(table(rows, ["shape", "H", "kernel", "ms", "tflops", "of_cublas_fp8", "speedup", "max_diff_vs_triton",
                       "inf_pattern_ok", "nan", "ref_err", "error"]))
    bad = [r for r in rows if r.get("nan") or "error" in r or r.get("ref_err", 0) > 1e-3
           or r.get("max_diff_vs_triton", 0) > 1e-4 or r.get("inf_pattern_ok") is False]
    at = {(r["shape"], r["H"]): r for r in rows if r["kernel"] == "gluon" and "ms" in r}
    g32 = at.get(("200K last 8192", 32), {}).get("of_cublas_fp8", 0.0)
    slower = [f"{sh} H={h}" for (sh, h), r in at.items() if r["speedup"] < 1.0]
    print("CHECK:", "all outputs match Triton within 1e-4 and the reference within 1e-3" if not bad
          else f"{len(bad)} rows failed (see table)",
          f"| Gluon at 200K H=32: {g32:.3f} of cuBLAS fp8 (target 0.75)",
          f"| Gluon slower than Triton at: {', '.join(slower) or 'none'}",
          f"| prefill picks {chosen} on capability {cap[0]}.{cap[1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
