"""Indexer q quantisation (``quantize_indexer_q``: one Triton launch on CUDA) against its PyTorch reference at an
8192-row prefill chunk and a decode row, 32 heads, bf16 q and weights; outputs compared bit for bit.

    python -m benchmarks.quantize_q      # a few seconds on an H200; JSON to $OUT
"""
from __future__ import annotations

import sys

import torch

from benchmarks.common import bench_ms, run_metadata, table, write_results
from indexcache.kernels.indexer import quantize_indexer_q
from indexcache.kernels.indexer.reference import quantize_indexer_q_ref


def main() -> int:
    g = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    for t in (8192, 16384, 1):
        q = torch.randn(t, 32, 128, device="cuda", generator=g).bfloat16()
        w = torch.randn(t, 32, device="cuda", generator=g).bfloat16()
        a, b = quantize_indexer_q(q, w), quantize_indexer_q_ref(q, w)
        same = torch.equal(a[0].view(torch.uint8), b[0].view(torch.uint8)) and torch.equal(a[1], b[1])
        ms, ms_ref = bench_ms(lambda: quantize_indexer_q(q, w)), bench_ms(lambda: quantize_indexer_q_ref(q, w))
        rows.append({"rows": t, "triton_us": 1000 * ms, "torch_us": 1000 * ms_ref, "speedup": ms_ref / ms,
                     "bit_identical": same, "TBps": q.numel() * 3 / ms / 1e9})
    write_results("quantize_q", {"meta": run_metadata(), "rows": rows})
    print(table(rows, ["rows", "triton_us", "torch_us", "speedup", "bit_identical", "TBps"]))
    return 0 if all(r["bit_identical"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
