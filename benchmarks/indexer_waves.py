"""The two-pass prefill indexer stage with and without wave-aligned row chunks, in one run.

    python -m benchmarks.indexer_waves [--context 200000] [--heads 32,64] [--reps 3]

A causal prefill of ``--context`` tokens is run as the engine runs it: steps of ``--step`` query rows (the
engine's default max_prefill_tokens), each ``indexer_topk_prefill_two_pass`` over the keys so far with the
engine's default workspace (1 GiB; ``benchmarks.e2e`` runs 16K-token steps and 4 GiB: ``--step``,
``--workspace-bytes``) and its top-k (``topk_rows``). Per head count, the whole stage is timed with the planner's
chunks aligned to whole waves of the logits kernel (``logits_wave_rows``) and with the plain plan
(``wave_rows=1``), alternating, the median of ``--reps``; the two must select the same index sets. Same-run
ceilings; JSON to $OUT (or runs/benchmarks) as indexer_waves.json. ``--tiny``: a CPU dry run of the script
(PyTorch paths).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from benchmarks.common import measure_ceilings, run_metadata, table, write_results
from indexcache.kernels.indexer import quantize_indexer_k, quantize_indexer_q
from indexcache.kernels.indexer.ops import indexer_topk_prefill_two_pass, logits_wave_rows, prefill_logits_kernel
from indexcache.kernels.topk import topk_rows


def stage(q8, w, k8, ks, context: int, step: int, topk: int, workspace: int, wave_rows: int | None):
    """One causal prefill's indexer stage, step by step; returns (seconds, the selections of every step)."""
    outs = []
    sync = torch.cuda.synchronize if q8.is_cuda else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for p0 in range(0, context, step):
        n = min(step, context - p0)
        ends = torch.arange(p0 + 1, p0 + n + 1, dtype=torch.int32, device=q8.device)
        starts = torch.zeros_like(ends)
        outs.append(indexer_topk_prefill_two_pass(q8[:n], w[:n], k8[:p0 + n], ks[:p0 + n], starts, ends, topk,
                                                  workspace_bytes=workspace, topk_fn=topk_rows,
                                                  wave_rows=wave_rows))
    sync()
    return time.perf_counter() - t0, outs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--context", type=int, default=200_000)
    ap.add_argument("--step", type=int, default=8192)
    ap.add_argument("--heads", default="32,64")
    ap.add_argument("--topk", type=int, default=2048)
    ap.add_argument("--workspace-bytes", type=int, default=1 << 30)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--tiny", action="store_true", help="CPU dry run (PyTorch paths): context 300, step 128, topk 16")
    args = ap.parse_args()
    dev = "cpu" if args.tiny else "cuda"
    if args.tiny:
        args.context, args.step, args.topk, args.workspace_bytes, args.reps = 300, 128, 16, 64 << 10, 1
    if args.context < 1 or args.step < 1 or args.reps < 1:
        raise SystemExit(f"indexer_waves: --context, --step and --reps must be >= 1, got {args.context}, "
                         f"{args.step}, {args.reps}")
    heads = [int(h) for h in args.heads.split(",")]
    meta = run_metadata()
    ceilings = measure_ceilings() if dev == "cuda" else {}
    g = torch.Generator().manual_seed(0)
    k8, ks = quantize_indexer_k(torch.randn(args.context, 128, generator=g).to(dev))
    rows = []
    for h in heads:
        q8, w = quantize_indexer_q(torch.randn(args.step, h, 128, generator=g).to(dev),
                                   torch.randn(args.step, h, generator=g).to(dev))
        cap = tuple(torch.cuda.get_device_capability()) if q8.is_cuda else None
        wave = logits_wave_rows(prefill_logits_kernel(cap, h), h, q8.device)
        times = {"aligned": [], "plain": []}
        outs = {}
        stage(q8, w, k8, ks, min(args.context, 4 * args.step), args.step, args.topk, args.workspace_bytes, None)
        for _ in range(args.reps):
            for name, wr in (("aligned", None), ("plain", 1)):
                s, outs[name] = stage(q8, w, k8, ks, args.context, args.step, args.topk, args.workspace_bytes, wr)
                times[name].append(s)
        # the same index sets row by row (the order inside a row is the top-k's own, unspecified)
        same = all(torch.equal(a.sort(1).values, b.sort(1).values) for a, b in zip(outs["aligned"], outs["plain"]))
        a, p = statistics.median(times["aligned"]), statistics.median(times["plain"])
        rows.append({"name": f"indexer stage H={h} ctx {args.context}", "H": h, "wave_rows": wave,
                     "aligned_s": round(a, 4), "plain_s": round(p, 4), "speedup": round(p / a, 3),
                     "same_outputs": same, "aligned_all_s": times["aligned"], "plain_all_s": times["plain"]})
        print(rows[-1], flush=True)
    write_results("indexer_waves", {"meta": meta, "ceilings": ceilings, "args": vars(args), "rows": rows})
    print(table(rows, ["name", "wave_rows", "aligned_s", "plain_s", "speedup", "same_outputs"]))


if __name__ == "__main__":
    main()
