"""The Gluon prefill indexer kernel at a long context against a short one, both forms (logits; the fused top-k's
candidates filter), in one run on one Hopper GPU: does its rate hold when the keys no longer fit in L2, and what
do the ring depth and the diagnostic modes change there.

    python -m benchmarks.indexer_gluon_long        # about 70 s on an H200; JSON to $OUT (or runs/benchmarks/)

Rows: the last 4224 query rows (four waves of 8-row programs on 132 SMs) of causal prefills of 200K keys at 32
and 64 heads and of 1M keys at 32. The logits form at 4 / 6 / 8 ring stages and with the ``loads`` /
``epilogue`` diagnostics ("none": the output is not the logits, timing only), each compared with the first row's
logits (``indexer_fused.logits_configs``); the candidates form (thresholds of a real fused run) at 4 / 6 / 8
stages, its lists and counts compared with the first's (``indexer_fused.candidates_alone``), and with the
``append`` diagnostic (the slots' atomics not waited for: timing only). Prints ms and the fraction of the same-run
cuBLAS fp8 ceiling per row, last.
"""
from __future__ import annotations

import torch

from benchmarks.common import measure_ceilings, run_metadata, table, write_results
from benchmarks.indexer_fused import candidates_alone, inputs, logits_configs

ROWS = 4224
CASES = [(32, 200_000), (64, 200_000), (32, 1_000_000)]  # (heads, keys)
LOGITS = [("4 stages", {}), ("6 stages", {"num_stages": 6}), ("8 stages", {"num_stages": 8}),
          ("loads none", {"loads": "none"}), ("epilogue none", {"epilogue": "none"})]
CANDIDATES = [("4 stages", {}), ("6 stages", {"num_stages": 6}), ("8 stages", {"num_stages": 8}),
              ("append none", {"append": "none"})]


def main() -> int:
    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9:
        print("indexer_gluon_long: needs a Hopper GPU (sm_90)")
        return 2
    ceilings = measure_ceilings()
    rows: list[dict] = []
    for h, s in CASES:
        data = inputs(torch.arange(s - ROWS, s, device="cuda"), s, h, seed=1)
        logits_configs(rows, ceilings, f"H{h} {s // 1000}K", h, data, configs=LOGITS, kernel="gluon")
        candidates_alone(rows, ceilings, f"H{h} {s // 1000}K", h, data, CANDIDATES, kernel="gluon")
        del data
        torch.cuda.empty_cache()
    write_results("indexer_gluon_long", {"meta": run_metadata(), "ceilings": ceilings, "rows": rows})
    print(f"ceilings: fp8 {ceilings['fp8_matmul_tflops']:.0f} TFLOP/s, bf16 {ceilings['bf16_matmul_tflops']:.0f}, "
          f"copy {ceilings['copy_tbps']:.2f} TB/s")
    print(table(rows, ["name", "ms", "frac_fp8_cublas", "same_as_default", "mean_candidates", "rows_differ",
                       "counts_equal", "error"]))
    # diagnostic rows ("none") time a kernel whose output is not the logits
    bad = [r for r in rows if "error" in r or ("none" not in r["name"]
                                               and (r.get("exact") is False or r.get("same_as_default") is False))]
    print("CHECK:", "every row ran; same logits / candidates as the first row of its form" if not bad
          else f"{len(bad)} rows failed or differ (see table)")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
