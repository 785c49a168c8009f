"""The Gluon grouped FP8 GEMM (promotion overlapped with the next block's MMA) against the Triton one, checked and
timed in one run on an H200, with the same-run cuBLAS fp8 ceilings.

    python -m benchmarks.fp8_gemm_gluon          # about 1-2 min on an H200 (compiles included); JSON to $OUT

Shapes (glm-4.7-flash-dsa's routed experts on an 8192-token prefill chunk: 64 experts, top-4 = 32768 pairs,
routed by random logits through ``expert_plan``):
- ``down``: K 1536 -> N 2048, rows scattered to pair order with their routing weights (as moe.py runs it),
  activation scales row-major (as the gate/up kernel writes h's);
- ``gate_up``: K 2048 -> N 3072 without the SwiGLU, on rows already gathered by token (the Gluon kernel does not
  gather), scales column-major (quantize_act's); the production fused Triton gate/up + SwiGLU kernel (with the
  gather) is timed beside it for context;
- ``dense``: one expert, 8192^3 (what the attention projections need), against cuBLAS's block-scaled GEMM
  (``F.scaled_mm`` BlockWise1x128 x BlockWise128x128) when this torch has it.
Every output is compared with the PyTorch reference (relative error of the norm; a bf16 output against the fp32
reference sits near 2e-3) and the Gluon outputs with the Triton one. A Gluon configuration that fails to compile
or launch becomes a row with its error, not a crash. Prints a table last.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import bench_ms, measure_ceilings, run_metadata, table, write_results  # noqa: E402
from indexcache.kernels.expert_plan import expert_plan  # noqa: E402
from indexcache.kernels.fp8_grouped_mm import fp8_grouped_mm_reference, fp8_grouped_swiglu  # noqa: E402
from indexcache.kernels.fp8_grouped_mm.gluon import fp8_grouped_mm_gluon  # noqa: E402
from indexcache.kernels.fp8_grouped_mm.triton import fp8_grouped_mm_triton  # noqa: E402
from indexcache.kernels.fp8_linear import quantize_act, quantize_weight, weight_scale_for_mm  # noqa: E402

# block_m, block_n, num_stages, maxnreg: 64-row tiles two CTAs an SM; 128-row tiles one CTA an SM
GLUON_CONFIGS = [(64, 128, 4, 128), (64, 128, 3, 128), (128, 128, 4, 168)]


def _experts(E, n, k, g):
    ws = [quantize_weight(torch.randn(n, k, generator=g, device="cuda") * 0.02) for _ in range(E)]
    return torch.stack([q for q, _ in ws]), torch.stack([s for _, s in ws])


def _rel(x, ref):
    return float((x.float() - ref).norm() / ref.norm())


def _run_case(name, a8, sa, plan, w, s, ceil_fp8, *, scatter, extra=None):
    """Triton (its default config) and each Gluon config on the same inputs: time, TFLOP/s, error."""
    m, k = a8.shape
    n = w.shape[1]
    flops = 2.0 * m * n * k
    kw = dict(out_rows=plan.pair, row_weight=plan.weight) if scatter else {}
    ref = fp8_grouped_mm_reference(a8, plan.counts, w, s, sa, torch.float32, **kw)
    rows = []
    tri = fp8_grouped_mm_triton(a8, plan.counts, w, s, sa, plan=plan, **kw)
    ms = bench_ms(lambda: fp8_grouped_mm_triton(a8, plan.counts, w, s, sa, plan=plan, **kw))
    rows.append({"shape": name, "kernel": "triton", "config": "default", "ms": ms, "tflops": flops / ms / 1e9,
                 "of_cublas_fp8": flops / ms / 1e9 / ceil_fp8, "rel_err": _rel(tri, ref)})
    for bm, bn, st, reg in GLUON_CONFIGS:
        cfg = {"block_m": bm, "block_n": bn, "num_stages": st, "maxnreg": reg}
        row = {"shape": name, "kernel": "gluon", "config": f"{bm}x{bn} s{st} r{reg}"}
        p = plan if bm in plan.tiles else None  # the tile map is built on the fly for other row tiles
        try:
            out = torch.full_like(tri, float("nan"))
            got = fp8_grouped_mm_gluon(a8, plan.counts, w, s, sa, out=out, config=cfg, plan=p, **kw)
            torch.cuda.synchronize()
            ms = bench_ms(lambda: fp8_grouped_mm_gluon(a8, plan.counts, w, s, sa, config=cfg, plan=p, **kw))
        except Exception as e:  # noqa: BLE001 - a config that does not build or run is a row
            rows.append({**row, "error": f"{type(e).__name__}: {str(e)[:200]}"})
            continue
        rows.append({**row, "ms": ms, "tflops": flops / ms / 1e9, "of_cublas_fp8": flops / ms / 1e9 / ceil_fp8,
                     "rel_err": _rel(got, ref), "nan": int(got.isnan().sum()), "vs_triton": _rel(got, tri.float()),
                     "speedup": rows[0]["ms"] / ms})
    for r in extra or []:
        rows.append({"shape": name, **r})
    return rows


def grouped_cases(tokens, top, E, d, inter, ceil_fp8, seed=0):
    g = torch.Generator("cuda").manual_seed(seed)
    logits = torch.randn(tokens, E, generator=g, device="cuda")
    weights, ids = logits.softmax(-1).topk(top, dim=-1)
    plan = expert_plan(ids, weights, E, (128, 64))
    m = tokens * top
    rows = []
    # down: h [pairs, inter] with row-major scales, scattered to pair order
    h8, sh = quantize_act(torch.randn(m, inter, generator=g, device="cuda", dtype=torch.bfloat16))
    sh = sh.contiguous()
    w, s = _experts(E, d, inter, g)
    rows += _run_case("down", h8, sh, plan, w, s, ceil_fp8, scatter=True)
    del w, s, h8, sh
    # gate/up without the SwiGLU on pre-gathered rows; the production fused kernel (gather + SwiGLU) for context
    x = torch.randn(tokens, d, generator=g, device="cuda", dtype=torch.bfloat16)
    x8, sx = quantize_act(x)
    xs8, sxs = quantize_act(x[plan.token.long()])
    w, s = _experts(E, 2 * inter, d, g)
    ms = bench_ms(lambda: fp8_grouped_swiglu(x8, plan.counts, w, s, sx, inter, a_rows=plan.token, plan=plan))
    fl = 2.0 * m * 2 * inter * d
    ctx = [{"kernel": "triton fused swiglu+gather", "config": "production", "ms": ms, "tflops": fl / ms / 1e9,
            "of_cublas_fp8": fl / ms / 1e9 / ceil_fp8}]
    rows += _run_case("gate_up", xs8, sxs, plan, w, s, ceil_fp8, scatter=False, extra=ctx)
    return rows


def dense_case(n, ceil_fp8, seed=1):
    g = torch.Generator("cuda").manual_seed(seed)
    w8, s8 = quantize_weight(torch.randn(n, n, generator=g, device="cuda") * 0.02)
    x = torch.randn(n, n, generator=g, device="cuda", dtype=torch.bfloat16)
    x8, sx = quantize_act(x)
    ids = torch.zeros(n, 1, dtype=torch.long, device="cuda")
    plan = expert_plan(ids, torch.ones(n, 1, device="cuda"), 1, (128, 64))
    extra = []
    if hasattr(F, "scaled_mm"):
        sb = weight_scale_for_mm(s8)
        flops = 2.0 * n ** 3

        def cublas():
            return F.scaled_mm(x8, w8.t(), sx, F.ScalingType.BlockWise1x128, sb, F.ScalingType.BlockWise128x128,
                               output_dtype=torch.bfloat16)

        ref = fp8_grouped_mm_reference(x8, plan.counts, w8[None], s8[None], sx, torch.float32)
        err = _rel(cublas(), ref)
        ms = bench_ms(cublas)
        extra.append({"kernel": "cublas scaled_mm blockwise", "config": "torch", "ms": ms,
                      "tflops": flops / ms / 1e9, "of_cublas_fp8": flops / ms / 1e9 / ceil_fp8, "rel_err": err})
        del ref
    return _run_case(f"dense {n}^3", x8, sx, plan, w8[None], s8[None], ceil_fp8, scatter=False, extra=extra)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--dense", type=int, default=8192)
    ap.add_argument("--name", default="fp8_gemm_gluon")
    args = ap.parse_args()
    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9:
        print("fp8_gemm_gluon: needs a Hopper GPU (sm_90)")
        return 2
    ceilings = measure_ceilings()
    fp8 = ceilings["fp8_matmul_tflops"]
    # glm-4.7-flash-dsa: hidden 2048, 64 routed experts of intermediate 1536, top-4
    rows = grouped_cases(args.tokens, 4, 64, 2048, 1536, fp8)
    rows += dense_case(args.dense, fp8)
    write_results(args.name, {"meta": run_metadata(), "ceilings": ceilings, "rows": rows,
                              "gluon_configs": GLUON_CONFIGS})
    print(f"ceilings: bf16 {ceilings['bf16_matmul_tflops']:.0f} TFLOP/s, fp8 {fp8:.0f}, "
          f"copy {ceilings['copy_tbps']:.2f} TB/s")
    print(table(rows, ["shape", "kernel", "config", "ms", "tflops", "of_cublas_fp8", "rel_err", "vs_triton", "nan",
                       "speedup", "error"]))
    bad = [r for r in rows if r.get("nan") or r.get("rel_err", 0) > 4e-3 or "error" in r]
    print("CHECK:", "all outputs within 4e-3 of the reference" if not bad else f"{len(bad)} rows failed (see table)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
