"""The one-launch prefill top-k (``topk_rows`` for R > 64 rows, ``_topk1_kernel``) against torch.topk and the
reference's sets, and an F layer's top-k + candidate pool from one read of the row (``topk_and_pool_rows``)
against the top-k alone, in one run on one GPU, with the same-run ceilings. Earlier runs timed replaced forms
beside the default in the same run: the uncapped registers (run 90), ``topk_pool_rows`` then a top-k of the pool
(run 90: 5.38 / 7.05 ms against 4.99 / 6.94), the scan with one candidate list a row and CTA-wide slots (run 122:
1.89 / 3.64 / 0.99 / 0.92 ms against 1.55 / 2.95 / 0.81 / 0.76 in the first, second, third and fifth case).

    python -m benchmarks.topk_prefill        # ~60 s on an H200; JSON to $OUT (or runs/benchmarks/)

Cases (k = 2048, fp32 logits): 4096 and 8192 x 200K causal (the last rows of a 200K prefill; 8192 is the e2e's
chunk), 2048 x 200K full rows, 8192 x 8192 (short rows), 256 x 1M; the pool cases add c = 4096 and 8192 to the
8192 x 200K causal rows. Effective TB/s = bytes of the valid windows read once / time; frac = of the same-run copy
ceiling. The default must select the reference's sets (``topk_rows_reference`` on a subset of rows), the pool
cases those of ``topk_rows`` and ``topk_pool_rows`` apart; a case that does not is reported as an error.
"""
from __future__ import annotations

import sys

import torch

from benchmarks.common import bench_ms, measure_ceilings, run_metadata, table, write_results
from indexcache.kernels.topk import (bracket_stats, topk_and_pool_rows, topk_pool_rows, topk_rows,
                                    topk_rows_reference)

K = 2048


def _sets(idx):
    return idx.sort(dim=1).values


def _rows(R, N, causal):
    torch.manual_seed(0)
    x = torch.randn(R, N, device="cuda")
    if causal:      # the last R query rows of a causal prefill over N keys: row i sees N - R + i + 1 keys
        ends = torch.arange(N - R + 1, N + 1, device="cuda", dtype=torch.int32)
        x.masked_fill_(torch.arange(N, device="cuda")[None, :] >= ends[:, None], float("-inf"))
    else:
        ends = torch.full((R,), N, device="cuda", dtype=torch.int32)
    sub = torch.unique(torch.cat([torch.arange(0, R, max(1, R // 64), device="cuda"),
                                  torch.tensor([R - 1], device="cuda")]))
    return x, ends, sub


def _case(name, R, N, causal, ceilings):
    x, ends, sub = _rows(R, N, causal)
    nbytes = ends.double().sum().item() * 4
    row = {"name": name, "shape": f"{R}x{N}{' causal' if causal else ''} k={K} fp32"}
    stats = {}
    new = topk_rows(x, K, row_end=ends, stats=stats)
    ref = topk_rows_reference(x[sub], K, row_end=ends[sub])
    row["same_sets_as_reference"] = bool(torch.equal(_sets(new[sub]), _sets(ref)))
    row["fallback_rows"] = bracket_stats(stats, K)[0]
    if not row["same_sets_as_reference"]:
        row["error"] = "selected sets differ"
    ms = bench_ms(lambda: topk_rows(x, K, row_end=ends))
    ms_torch = bench_ms(lambda: torch.topk(x, K, dim=1, sorted=False))
    row.update(ms=ms, ms_torch_topk=ms_torch, speedup_vs_torch=ms_torch / ms, tbps=nbytes / ms / 1e9,
               frac=nbytes / ms / 1e9 / ceilings["copy_tbps"])
    del x
    torch.cuda.empty_cache()
    return row


def _pool_case(c, ceilings, R=8192, N=200_000):
    x, ends, sub = _rows(R, N, True)
    nbytes = ends.double().sum().item() * 4
    row = {"name": f"top-k + pool {c}", "shape": f"{R}x{N} causal k={K} c={c} fp32"}
    new = topk_and_pool_rows(x, K, c, row_end=ends)
    same = (torch.equal(_sets(new[:, :K]), _sets(topk_rows(x, K, row_end=ends)))
            and torch.equal(_sets(new[:, K:]), _sets(topk_pool_rows(x, c, row_end=ends))))
    ref_ok = (torch.equal(_sets(new[sub, :K]), _sets(topk_rows_reference(x[sub], K, row_end=ends[sub])))
              and torch.equal(_sets(new[sub, K:]), _sets(topk_rows_reference(x[sub], c, row_end=ends[sub]))))
    row.update(same_sets_as_separate=same, same_sets_as_reference=ref_ok)
    if not (same and ref_ok):
        row["error"] = "selected sets differ"
    ms = bench_ms(lambda: topk_and_pool_rows(x, K, c, row_end=ends))
    ms_topk = bench_ms(lambda: topk_rows(x, K, row_end=ends))
    row.update(ms=ms, ms_topk_alone=ms_topk, tbps=nbytes / ms / 1e9, frac=nbytes / ms / 1e9 / ceilings["copy_tbps"])
    del x
    torch.cuda.empty_cache()
    return row


def main() -> int:
    if not torch.cuda.is_available():
        print("benchmarks.topk_prefill needs a CUDA GPU")
        return 2
    ceilings = measure_ceilings()
    print("ceilings:", ceilings, flush=True)
    rows = []
    cases = [(_case, ("200K causal", 4096, 200_000, True)), (_case, ("200K causal 8192", 8192, 200_000, True)),
             (_case, ("200K full", 2048, 200_000, False)), (_case, ("8K short", 8192, 8192, False)),
             (_case, ("1M", 256, 1 << 20, False)), (_pool_case, (4096,)), (_pool_case, (8192,))]
    for fn, args in cases:
        try:
            rows.append(fn(*args, ceilings))
        except Exception as e:  # noqa: BLE001 - report the case and go on
            rows.append({"name": str(args[0]), "error": f"{type(e).__name__}: {e}"})
        print(rows[-1], flush=True)
    paths = write_results("topk_prefill", {"meta": run_metadata(), "ceilings": ceilings, "rows": rows})
    print("wrote", paths)
    print(table(rows, ["name", "shape", "ms", "ms_topk_alone", "ms_torch_topk", "speedup_vs_torch", "tbps",
                       "frac", "fallback_rows", "same_sets_as_separate",
                       "same_sets_as_reference", "error"]))
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
