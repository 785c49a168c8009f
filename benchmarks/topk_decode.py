"""Decode top-k on the GPU: ``topk_rows_decode`` (one row over many programs) against ``topk_rows`` (the engine's
decode path above EngineConfig.decode_topk_max_rows) and ``torch.topk``, each replayed in a CUDA graph, k = 2048, fp32 scores.

    python -m benchmarks.topk_decode

First checks the selections (index sets against the PyTorch reference and the current kernel, graph replays on
fresh inputs, the workspace left zeroed); then times the cases (both kernels given int32 row ends, as the engine
calls them), profiles the new kernel's three launches (hist, filter1, filter2_final) inside the graph for every
case, times 200K batch 1 over a few launch shapes (``tuning_sweep``), and prints tables last; writes
``topk_decode.json`` ($OUT, else runs/benchmarks). About a minute and a half on an H200.
"""
from __future__ import annotations

if __name__ == "__main__":  # without a GPU, refuse before the seconds-long torch import
    from benchmarks.require_gpu import require_gpu

    require_gpu("python -m benchmarks.topk_decode",
                "python -m pytest tests/kernels/test_topk_decode.py (Triton interpreter)")

import torch
import triton.testing
from torch.profiler import ProfilerActivity, profile

from benchmarks.common import measure_ceilings, run_metadata, table, write_results
from indexcache.kernels.topk import (DecodeTopkWorkspace, plan_decode_launches, topk_rows, topk_rows_decode,
                                     topk_rows_reference)

K = 2048
# (name, batch, row length, score distribution)
CASES = [("200K", 1, 200_000, "randn"), ("200K_b4", 4, 200_000, "randn"), ("64K", 1, 64_000, "randn"),
         ("1M", 1, 1_000_000, "randn"), ("200K_narrow", 1, 200_000, "narrow"), ("200K_ties", 1, 200_000, "ties"),
         # the engine's decode batches up to EngineConfig.decode_topk_max_rows (64) take the new kernel
         ("200K_b16", 16, 200_000, "randn"), ("200K_b64", 64, 200_000, "randn")]


def _scores(B, N, dist, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(B, N, device="cuda", generator=g)
    if dist == "narrow":    # a small spread on a large mean: most keys share the first radix digit
        x = 10.0 + 0.01 * x
    elif dist == "ties":    # a few levels only: thousands of ties at the threshold
        x = (x * 2).round()
    return x


def _same_sets(a, b):
    return torch.equal(a.sort(dim=1).values, b.sort(dim=1).values)


def _graph_ms(fn):
    return float(triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median"))


def check(name, B, N, dist) -> dict:
    """Index sets of the new kernel against the reference and topk_rows, eager and in graph replays."""
    x = _scores(B, N, dist, 1)
    ends = torch.tensor([N - 13 * i for i in range(B)], dtype=torch.int32, device="cuda")
    ws = DecodeTopkWorkspace.new(B, N, "cuda")
    ref = topk_rows_reference(x, K, row_end=ends)
    new = topk_rows_decode(x, K, row_end=ends, workspace=ws)
    old = topk_rows(x, K, row_end=ends)
    ok = {"vs_reference": _same_sets(new, ref), "vs_topk_rows": _same_sets(new, old)}
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = topk_rows_decode(x, K, row_end=ends, workspace=ws)
    replay_ok = True
    for seed in (2, 3):
        x.copy_(_scores(B, N, dist, seed))
        g.replay()
        replay_ok &= _same_sets(out, topk_rows_reference(x, K, row_end=ends))
    ok["graph_replay"] = replay_ok
    ok["workspace_reset"] = not (ws.hist.any() or ws.ctr.any())
    del g
    return ok


def launch_profile(x, ws) -> dict:
    """GPU time per launch of the new kernel inside a graph replay (microseconds per call)."""
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        topk_rows_decode(x, K, workspace=ws)
    n = 50
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            g.replay()
        torch.cuda.synchronize()
    parts = {}
    for ev in prof.key_averages():
        t = getattr(ev, "self_device_time_total", None)
        if t is None:
            t = getattr(ev, "self_cuda_time_total", 0)
        if t > 0 and "dtopk" in ev.key:
            parts[ev.key.split("_kernel")[0].replace("_dtopk_", "")] = round(t / n, 2)
    return parts


def tuning_sweep() -> list[dict]:
    """200K, batch 1 replayed in a graph over a few (entries per program, warps of hist / filter1): data for the
    kernel's defaults (_D_PROGS_PER_SM, _D_WARPS); every variant's selection is checked."""
    N = 200_000
    x = _scores(1, N, "randn", 5)
    ends = torch.full((1,), N, dtype=torch.int32, device="cuda")
    ws = DecodeTopkWorkspace.new(1, N, "cuda")
    ref = topk_rows_reference(x, K)
    out = []
    for sl, w in ((None, None), (2048, 4), (4096, 4), (1024, 8), (2048, 8), (4096, 8)):
        stages, run = plan_decode_launches(x, K, row_end=ends, workspace=ws, _slice=sl, _warps=w)
        row = {"slice": sl or "default", "warps": w or "default"}
        try:
            if not _same_sets(run(), ref):
                raise AssertionError("selection differs from the reference")
            row["us"] = _graph_ms(run) * 1e3
            row["programs"] = -(-N // sl) if sl else "default"
        except Exception as e:  # noqa: BLE001 (a failing variant is reported)
            row["error"] = repr(e)[:200]
        print(row)
        out.append(row)
    return out


def main():
    meta = run_metadata()
    ceilings = measure_ceilings()
    print("ceilings:", {k: (round(v, 1) if isinstance(v, float) else v) for k, v in ceilings.items()})
    rows = []
    for name, B, N, dist in CASES:
        row = {"case": name, "batch": B, "n": N, "k": K, "dist": dist}
        try:
            row.update(check(name, B, N, dist))
            x = _scores(B, N, dist, 4)
            ws = DecodeTopkWorkspace.new(B, N, "cuda")
            ends = torch.full((B,), N, dtype=torch.int32, device="cuda")   # int32 row ends, as the engine passes
            row["new_us"] = _graph_ms(lambda: topk_rows_decode(x, K, row_end=ends, workspace=ws)) * 1e3
            row["topk_rows_us"] = _graph_ms(lambda: topk_rows(x, K, row_end=ends)) * 1e3
            row["torch_topk_us"] = _graph_ms(lambda: torch.topk(x, K, dim=1, sorted=False)) * 1e3
            row["speedup"] = row["topk_rows_us"] / row["new_us"]
            row["tbps"] = B * N * 4 / (row["new_us"] * 1e-6) / 1e12
            row["frac_copy"] = row["tbps"] / ceilings["copy_tbps"]
            row["parts_us"] = launch_profile(x, ws)
            print(f"new kernel launches at {name} (us, graph replay):", row["parts_us"])
        except Exception as e:  # one failing case is reported, the others still run
            row["error"] = repr(e)[:300]
        print(row)
        rows.append(row)
    sweep = tuning_sweep()
    paths = write_results("topk_decode", {"meta": meta, "ceilings": ceilings, "rows": rows, "sweep_200K_b1": sweep})
    print("wrote", paths)
    for row in rows:
        for part, us in row.get("parts_us", {}).items():
            row[f"{part}_us"] = us
    print("200K batch 1 by entries per program (slice) and hist/filter1 warps; the default is slice "
          f"{sweep[0]['slice']}, {sweep[0]['warps']} warps (first row):")
    print(table(sweep, ["slice", "warps", "programs", "us", "error"]))
    print(table(rows, ["case", "vs_reference", "vs_topk_rows", "graph_replay", "workspace_reset", "new_us",
                       "topk_rows_us", "torch_topk_us", "speedup", "hist_us", "filter1_us", "filter2_final_us",
                       "error"]))


if __name__ == "__main__":
    main()
