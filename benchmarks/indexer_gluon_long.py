"""The Gluon prefill indexer kernel at a long context against a short one, both forms (logits; the fused top-k's
candidates filter), in one run on one Hopper GPU: does its rate hold when the keys no longer fit in L2, and what
do the ring depth and the diagnostic modes change there.

    python -m benchmarks.indexer_gluon_long        # about 40 s on an H200; JSON to $OUT (or runs/benchmarks/)

Rows: the last 4224 query rows (four waves of 8-row programs on 132 SMs) of causal prefills of 200K and 1M keys,
32 heads. The logits form at 4 / 6 / 8 ring stages and with the ``loads`` / ``epilogue`` diagnostics ("none":
the output is not the logits, timing only); the candidates form (thresholds of a real fused run) at 4 / 6 / 8
stages. Every full-logits row must equal the first one bit for bit, every candidates row must give the same
counts. Prints ms and the fraction of the same-run cuBLAS fp8 ceiling per row, last.
"""
from __future__ import annotations

import torch

from benchmarks.common import bench_ms, measure_ceilings, run_metadata, table, write_results
from benchmarks.indexer_fused import inputs
from indexcache.kernels import indexer as ix

H, ROWS, TOPK = 32, 4224, 2048
LOGITS = [("logits, 4 stages", {}), ("logits, 6 stages", {"num_stages": 6}), ("logits, 8 stages", {"num_stages": 8}),
          ("logits, loads none", {"loads": "none"}), ("logits, epilogue none", {"epilogue": "none"})]
CANDIDATES = [("candidates, 4 stages", {}), ("candidates, 6 stages", {"num_stages": 6}),
              ("candidates, 8 stages", {"num_stages": 8})]


def shape_rows(s: int, ceil_fp8: float) -> list[dict]:
    q8, w, k8, ks, rs, re = inputs(torch.arange(s - ROWS, s, device="cuda"), s, H, seed=1)
    flops = 2 * (re - rs).double().sum().item() * H * 128
    stats: dict = {}
    ix.indexer_topk_prefill_fused(q8, w, k8, ks, rs, re, TOPK, stats=stats,
                                  out=torch.empty(ROWS, TOPK, dtype=torch.int32, device="cuda"))
    thr, cap = stats["thr"], stats["cap"]
    out = torch.empty(ROWS, s, device="cuda")
    rows, first_logits, first_counts = [], None, None
    for name, cfg in LOGITS + CANDIDATES:
        row = {"keys": s, "rows": ROWS, "H": H, "name": name}
        try:
            if name.startswith("candidates"):
                bufs = (torch.empty(ROWS, cap, device="cuda"), torch.empty(ROWS, cap, dtype=torch.int32, device="cuda"),
                        torch.empty(ROWS, 2, dtype=torch.int32, device="cuda"))

                def fn(cfg=cfg, bufs=bufs):  # counts are zeroed by the kernel's launcher
                    ix.indexer_prefill_candidates(q8, w, k8, ks, rs, re, thr, cap, out=bufs, config=cfg,
                                                  kernel="gluon")
            else:
                def fn(cfg=cfg):
                    ix.indexer_logits(q8, w, k8, ks, rs, re, out=out, config=cfg, kernel="gluon")
            ms = bench_ms(fn, warmup_ms=20, rep_ms=150)
            fn()
            torch.cuda.synchronize()
            row.update(ms=ms, tflops=flops / ms / 1e9, of_cublas_fp8=flops / ms / 1e9 / ceil_fp8)
            if name.startswith("candidates"):
                if first_counts is None:
                    first_counts = bufs[2].clone()
                    row["mean_candidates"] = float(first_counts[:, 0].float().mean())
                else:
                    row["same_as_first"] = bool(torch.equal(bufs[2], first_counts))
            elif "none" not in name:
                if first_logits is None:
                    first_logits = out.clone()
                else:
                    row["same_as_first"] = bool(torch.equal(out, first_logits))
        except Exception as e:  # noqa: BLE001 - a config that fails is a row, the others still run
            row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
        rows.append(row)
        print(row, flush=True)
    del out, first_logits, q8, k8
    torch.cuda.empty_cache()
    return rows


def main() -> int:
    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9:
        print("indexer_gluon_long: needs a Hopper GPU (sm_90)")
        return 2
    ceilings = measure_ceilings()
    rows = shape_rows(200_000, ceilings["fp8_matmul_tflops"]) + shape_rows(1_000_000, ceilings["fp8_matmul_tflops"])
    write_results("indexer_gluon_long", {"meta": run_metadata(), "ceilings": ceilings, "rows": rows})
    print(f"ceilings: fp8 {ceilings['fp8_matmul_tflops']:.0f} TFLOP/s, bf16 {ceilings['bf16_matmul_tflops']:.0f}, "
          f"copy {ceilings['copy_tbps']:.2f} TB/s")
    print(table(rows, ["keys", "name", "ms", "of_cublas_fp8", "same_as_first", "mean_candidates", "error"]))
    bad = [r for r in rows if "error" in r or r.get("same_as_first") is False]
    print("CHECK:", "every row ran; same logits / counts as the first row of its form" if not bad
          else f"{len(bad)} rows failed or differ (see table)")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
