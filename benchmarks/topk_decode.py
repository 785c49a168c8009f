"""Decode top-k on the GPU: ``topk_rows_decode`` (one row over many programs) against ``torch.topk``, each
replayed in a CUDA graph, k = 2048, fp32 scores. (Run 62 timed it against the kernels it replaced, a 4096-bin
first digit: ``benchmarks/results/topk_decode_h200_run62.json``.)

    python -m benchmarks.topk_decode

Per case: first checks the selections (index sets against the PyTorch reference and ``topk_rows``; graph
replays on fresh inputs; the workspace left zeroed); then times the kernel (two rounds, best median) and
torch.topk, and profiles the kernel's three launches inside a graph. Int32 row ends, as the engine calls it. Prints a table last; writes ``topk_decode.json`` ($OUT, else runs/benchmarks) with
same-run ceilings. About a minute on an H200.
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
from indexcache.kernels.topk import DecodeTopkWorkspace, topk_rows, topk_rows_decode, topk_rows_reference

K = 2048
# (name, batch, row length, row end (None: the whole row), score distribution)
CASES = [("200K", 1, 200_000, None, "randn"), ("200K_b4", 4, 200_000, None, "randn"),
         ("200K_b8", 8, 200_000, None, "randn"), ("1M", 1, 1_000_000, None, "randn"),
         ("64K", 1, 64_000, None, "randn"),
         # the engine's graphs score max_model_len keys with the context length as the row end
         ("200K_of_256K", 1, 262_144, 200_000, "randn"),
         ("200K_narrow", 1, 200_000, None, "narrow"), ("200K_ties", 1, 200_000, None, "ties"),
         # the engine's decode batches up to EngineConfig.decode_topk_max_rows (64) take this kernel
         ("200K_b16", 16, 200_000, None, "randn"), ("200K_b64", 64, 200_000, None, "randn")]


def _scores(B, N, dist, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(B, N, device="cuda", generator=g)
    if dist == "narrow":    # a small spread on a large mean: every key shares the first radix digit
        x = 10.0 + 0.01 * x
    elif dist == "ties":    # a few levels only: thousands of ties at the threshold
        x = (x * 2).round()
    return x


def _same_sets(a, b):
    return torch.equal(a.sort(dim=1).values, b.sort(dim=1).values)


def _graph_us(fn, rep=60):
    return float(triton.testing.do_bench_cudagraph(fn, rep=rep, return_mode="median")) * 1e3


def _path(x, ends, ws):
    """A thunk of the kernel on x (returns its output)."""
    return lambda: topk_rows_decode(x, K, row_end=ends, workspace=ws)


def check(B, N, end, dist) -> dict:
    """Index sets (ragged row ends) against the reference and topk_rows, eager and in graph replays."""
    x = _scores(B, N, dist, 1)
    e0 = end or N
    ends = torch.tensor([e0 - 13 * i for i in range(B)], dtype=torch.int32, device="cuda")
    ws = DecodeTopkWorkspace.new(B, N, "cuda")
    new_fn = _path(x, ends, ws)
    new = new_fn()
    ok = {"vs_reference": _same_sets(new, topk_rows_reference(x, K, row_end=ends)),
          "vs_topk_rows": _same_sets(new, topk_rows(x, K, row_end=ends))}
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = new_fn()
    replay_ok = True
    for seed in (2, 3):
        x.copy_(_scores(B, N, dist, seed))
        g.replay()
        replay_ok &= _same_sets(out, topk_rows_reference(x, K, row_end=ends))
    ok["graph_replay"] = replay_ok
    ok["workspace_reset"] = not (ws.hist.any() or ws.ctr.any())
    del g
    return ok


def launch_profile(fn) -> dict:
    """GPU time per launch of a path inside a graph replay (microseconds per call)."""
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
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


def main():
    meta = run_metadata()
    ceilings = measure_ceilings()
    print("ceilings:", {k: (round(v, 1) if isinstance(v, float) else v) for k, v in ceilings.items()})
    rows = []
    for name, B, N, end, dist in CASES:
        row = {"case": name, "batch": B, "n": N, "row_end": end or N, "k": K, "dist": dist}
        try:
            row.update(check(B, N, end, dist))
            x = _scores(B, N, dist, 4)
            ends = torch.full((B,), end or N, dtype=torch.int32, device="cuda")  # int32 row ends, as the engine
            new_fn = _path(x, ends, DecodeTopkWorkspace.new(B, N, "cuda"))
            new_t = [_graph_us(new_fn) for _ in range(2)]
            row["new_us"], row["new_rounds_us"] = min(new_t), new_t
            xe = x[:, : end or N]
            row["torch_topk_us"] = _graph_us(lambda: torch.topk(xe, K, dim=1, sorted=False))
            row["speedup_vs_torch"] = row["torch_topk_us"] / row["new_us"]
            row["tbps"] = B * (end or N) * 4 / (row["new_us"] * 1e-6) / 1e12
            row["frac_copy"] = row["tbps"] / ceilings["copy_tbps"]
            row["parts_new_us"] = launch_profile(new_fn)
            print(f"{name} launches (us, graph replay): {row['parts_new_us']}")
        except Exception as e:  # one failing case is reported, the others still run
            row["error"] = repr(e)[:300]
        print(row, flush=True)
        rows.append(row)
    paths = write_results("topk_decode", {"meta": meta, "ceilings": ceilings, "rows": rows})
    print("wrote", paths)
    for row in rows:
        for part, us in row.get("parts_new_us", {}).items():
            row[f"new_{part}"] = us
        row["sets_ok"] = all(row.get(c) for c in ("vs_reference", "vs_topk_rows", "graph_replay", "workspace_reset"))
    print("new = topk_rows_decode; us per call in a CUDA graph (best of two medians); new_hist / new_filter1 / "
          "new_filter2_final: GPU time per launch; sets_ok: index sets vs reference and topk_rows, graph replays, "
          "workspace zeroed")
    print(table(rows, ["case", "sets_ok", "new_us", "torch_topk_us", "speedup_vs_torch", "new_hist", "new_filter1",
                       "new_filter2_final", "error"]))


if __name__ == "__main__":
    main()
