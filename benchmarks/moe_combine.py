"""Time and check ways to sum each token's K expert outputs (the MoE combine) at prefill-chunk sizes on the GPU.

    python -m benchmarks.moe_combine          # about 30 s on an H200; JSON to $OUT (or runs/benchmarks/)

Rows come out of the expert GEMMs in expert order; each variant returns [N, D] bf16. ``index_add`` is the old
combine (bf16 atomics: the bits depend on the atomic order); the others sum in a fixed order and must give the same
bits twice. Printed: ms per call, the error against an fp64 sum, and whether two calls agree bitwise.
"""
from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import bench_ms, measure_ceilings, run_metadata, table, write_results  # noqa: E402
from indexcache.model.moe import combine_experts, expert_order  # noqa: E402


def index_add(ys, order, w):
    K = w.shape[1]
    ys = ys * w.flatten()[order, None].to(ys.dtype)
    return torch.zeros(w.shape[0], ys.shape[1], dtype=ys.dtype, device=ys.device).index_add_(0, order // K, ys)


def fp32_sum(ys, order, w):
    N, K = w.shape
    pairs = torch.empty_like(ys).index_copy_(0, order, ys).view(N, K, -1)
    return (pairs.float() * w.float()[:, :, None]).sum(1).to(ys.dtype)


def main() -> int:
    ceilings = measure_ceilings()
    rows = []
    for N, K, D, E in ((16384, 4, 2048, 64), (16384, 8, 7168, 256), (512, 4, 2048, 64)):
        g = torch.Generator("cuda").manual_seed(N + K)
        ids = torch.randint(0, E, (N, K), generator=g, device="cuda")
        order = expert_order(ids.flatten(), E)
        ys = torch.randn(N * K, D, generator=g, device="cuda").to(torch.bfloat16)
        w = torch.rand(N, K, generator=g, device="cuda")
        pairs64 = torch.empty_like(ys).index_copy_(0, order, ys).view(N, K, D).double()
        want = (pairs64 * w.double()[:, :, None]).sum(1)
        for name, fn in (("index_add", index_add), ("fp32_sum", fp32_sum), ("combine_experts", combine_experts)):
            a, b = fn(ys, order, w), fn(ys, order, w)
            err = float((a.double() - want).abs().max() / want.abs().max())
            ms = bench_ms(lambda: fn(ys, order, w))
            rows.append({"N": N, "K": K, "D": D, "variant": name, "ms": ms, "max_rel_err": err,
                         "same_bits_twice": bool(torch.equal(a, b)),
                         "gbps_pairs": N * K * D * 2 / ms / 1e6})
            print(rows[-1], flush=True)
    write_results("moe_combine", {"meta": run_metadata(), "ceilings": ceilings, "rows": rows})
    print(table(rows, ["N", "K", "D", "variant", "ms", "max_rel_err", "same_bits_twice", "gbps_pairs"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
