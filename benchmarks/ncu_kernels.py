"""Nsight Compute profiles of the prefill kernels that bound the long-context targets: the Gluon indexer kernel (its
logits form at 200K keys and its candidates form at 1M) and sparse MLA prefill at 20 heads (the Triton bf16-cache kernel and the Gluon FP8-cache one), one launch each, on one Hopper GPU.

    python -m benchmarks.ncu_kernels           # about 4 min on an H200 whose runtime lets ncu read the counters
    python -m benchmarks.ncu_kernels --only top-k,candidates   # the kernels whose names hold these words

Runs itself under ``ncu`` (``--clock-control none``: the clocks are left as they are; ``--set full``; only the
launches between cudaProfilerStart and cudaProfilerStop, after a warm-up of each kernel), then reads the report
back and writes to $OUT (or runs/benchmarks/): ``ncu_kernels.json`` (per kernel: the metrics below and its ten
SASS instructions with the most warp-stall samples, with their top reasons), ``ncu_details.csv.gz`` (every
section's metrics) and ``ncu_source.csv.gz`` (each kernel's SASS with its samples). Prints a table last: duration, SM clock, issue slots busy, tensor pipe busy, L2 and DRAM
throughput, shared-memory pipe, and the largest stall reasons per issued instruction.

Shapes: the indexer's last 2112 query rows (two waves of 8-row programs) at 32 heads of a
causal 200K (logits) and 1M (candidates, thresholds from a real fused run) prefill; sparse MLA 4096 queries at the
end of a 200K context, top-k 2048, random index sets (the benchmarks' worst case for caches); the prefill top-k
(k 2048) over the 200K logits of the first case.
"""
from __future__ import annotations

import csv
import gzip
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile

# the profiled launches in order: (name, kernel-name regex part); the target runs the selected ones, once each
KERNELS = [
    ("indexer logits H32 200K", "_logits_ws_kernel"),
    ("indexer candidates H32 1M", "_logits_ws_kernel"),
    ("sparse MLA bf16 20 heads", "_sparse_mla_prefill_kernel"),
    ("sparse MLA fp8 gluon 20 heads", "_sparse_mla_prefill_fp8_gluon_kernel"),
    ("top-k prefill 2112 x 200K causal", "_topk1_kernel"),
]


def selected(argv: list[str]) -> list[tuple[str, str]]:
    """KERNELS whose names contain one of ``--only``'s comma-separated words (all without it)."""
    if "--only" not in argv:
        return list(KERNELS)
    i = argv.index("--only")
    words = [w.strip() for w in (argv[i + 1] if i + 1 < len(argv) else "").split(",") if w.strip()]
    chosen = [k for k in KERNELS if any(w in k[0] for w in words)]
    if not chosen:
        raise SystemExit(f"ncu_kernels: --only {','.join(words) or '(nothing)'} matches none of "
                         f"{[k[0] for k in KERNELS]}")
    return chosen
ROWS, MLA_QUERIES = 2112, 4096

# (column, metric name on ncu's details page) of the summary table
METRICS = [
    ("ms", "Duration"),
    ("sm_mhz", "SM Frequency"),
    ("issue_busy_pct", "Issue Slots Busy"),
    ("sm_pct", "Compute (SM) Throughput"),
    ("dram_pct", "DRAM Throughput"),
    ("l2_pct", "L2 Cache Throughput"),
    ("l2_hit_pct", "L2 Hit Rate"),
    ("l1_pct", "L1/TEX Cache Throughput"),
    ("occupancy_pct", "Achieved Occupancy"),
    ("eligible_warps", "Eligible Warps Per Scheduler"),
    ("registers", "Registers Per Thread"),
]
STALL_PREFIX = "smsp__average_warps_issue_stalled_"
STALL_SUFFIX = "_per_issue_active.ratio"


def target(kernels: list[tuple[str, str]]) -> None:
    """The profiled program: build every case (the top-k reads the indexer's logits), warm the chosen kernels up
    (compiles), then run each once between profiler start/stop."""
    import torch

    import benchmarks.indexer_fused as bf
    from benchmarks.sparse_mla_prefill import CTX, SCALE, index_sets
    from indexcache.kernels import indexer as ix
    from indexcache.kernels.sparse_mla import quantize_latent_fp8_reference, sparse_mla_prefill
    from indexcache.kernels.topk import topk_rows

    calls = []
    s200 = 200_000
    d200 = bf.inputs(torch.arange(s200 - ROWS, s200, device="cuda"), s200, 32, seed=1)
    out200 = torch.empty(ROWS, s200, device="cuda")
    calls.append(lambda: ix.indexer_logits(*d200, out=out200, kernel="gluon"))
    s1m = 1_000_000
    d1m = bf.inputs(torch.arange(s1m - ROWS, s1m, device="cuda"), s1m, 32, seed=1)
    st = {}
    bf.run("fused", *d1m, torch.empty(ROWS, bf.TOPK, dtype=torch.int32, device="cuda"), st)
    cap, thr = st["cap"], st["thr"]
    bufs = (torch.empty(ROWS, cap, device="cuda"), torch.empty(ROWS, cap, dtype=torch.int32, device="cuda"),
            torch.empty(ROWS, 2, dtype=torch.int32, device="cuda"))
    calls.append(lambda: ix.indexer_prefill_candidates(*d1m, thr, cap, out=bufs, kernel="gluon"))
    kv = torch.randn(CTX, 576, device="cuda", dtype=torch.bfloat16)
    kv8 = quantize_latent_fp8_reference(kv.float())
    idx = index_sets(MLA_QUERIES)["random"]
    q = torch.randn(MLA_QUERIES, 20, 576, device="cuda", dtype=torch.bfloat16)
    calls.append(lambda: sparse_mla_prefill(q, kv, idx, SCALE))
    calls.append(lambda: sparse_mla_prefill(q, kv8, idx, SCALE, kv_format="fp8", backend="gluon"))
    calls.append(lambda: topk_rows(out200, bf.TOPK, row_end=d200[5]))
    assert len(calls) == len(KERNELS)
    calls[0]()  # the top-k's input
    chosen = [c for c, k in zip(calls, KERNELS) if k in kernels]
    for c in chosen:
        c()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStart()
    for c in chosen:
        c()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStop()


def _rows(csv_text: str, header: str = '"') -> list[dict]:
    """The CSV's data rows from its first line that starts with ``header`` (ncu's lines that are not CSV, the
    source page's kernel-name line and the raw page's units row dropped)."""
    lines = [ln for ln in csv_text.splitlines() if ln.startswith('"')]
    start = next((i for i, ln in enumerate(lines) if ln.startswith(header)), len(lines))
    rows = list(csv.DictReader(io.StringIO("\n".join(lines[start:]))))
    return [r for r in rows if "ID" not in r or (r["ID"] or "").strip().isdigit()]


def _num(v: str):
    try:
        return float(v.replace(",", ""))
    except (AttributeError, ValueError):
        return None


def details_by_launch(details_csv: str) -> dict[int, dict]:
    """The details page (base units) as {launch ID: {metric name: value}}; ms and MHz for time and clock."""
    out: dict[int, dict] = {}
    for r in _rows(details_csv):
        v = _num(r.get("Metric Value", ""))
        if v is None:
            continue
        unit = r.get("Metric Unit", "")
        if unit in ("ns", "nsecond"):
            v /= 1e6
        elif unit in ("hz", "Hz", "cycle/second"):
            v /= 1e6
        out.setdefault(int(r["ID"]), {})[r["Metric Name"]] = v
    return out


def summarize(ncu: str, rep: str, sources: list, details_csv: str, kernels: list[tuple[str, str]]) -> list[dict]:
    """Per profiled launch: METRICS, the stall reasons (per issued instruction, largest first) and the SASS lines
    with the most stall samples. Appends each launch's source page (CSV text) to ``sources``."""
    raw = subprocess.run([ncu, "-i", rep, "--page", "raw", "--csv", "--print-units", "base"], capture_output=True,
                         text=True, check=True)
    launches = _rows(raw.stdout)
    details = details_by_launch(details_csv)
    out = []
    for i, (name, _) in enumerate(kernels):
        r = launches[i] if i < len(launches) else {}
        row = {"name": name, "kernel": r.get("Kernel Name", "")[:60]}
        for col, m in METRICS:
            row[col] = details.get(i, {}).get(m)
        stalls = {k[len(STALL_PREFIX):-len(STALL_SUFFIX)]: _num(v) for k, v in r.items()
                  if k.startswith(STALL_PREFIX) and k.endswith(STALL_SUFFIX) and "not_issued" not in k}
        stalls = {k: v for k, v in stalls.items() if v}
        row["stalls"] = dict(sorted(stalls.items(), key=lambda kv: -kv[1]))
        row["top_stalls"] = ", ".join(f"{k} {v:.2f}" for k, v in list(row["stalls"].items())[:4])
        src = subprocess.run([ncu, "-i", rep, "--page", "source", "--csv", "--print-source", "sass",
                              "--launch-skip", str(i), "--launch-count", "1"], capture_output=True, text=True)
        sources.append(f"### {name}\n{src.stdout}{src.stderr[-500:]}")
        try:
            row["hot_sass"] = _hot_sass(src.stdout)
        except Exception as e:  # the page's columns differ between ncu versions: keep the raw text regardless
            row["hot_sass"] = [{"sass": f"unparsed: {e!r}"[:90], "samples": None, "reasons": {}}]
        out.append(row)
    return out


def _hot_sass(csv_text: str, n: int = 10) -> list[dict]:
    """The n SASS lines with the most warp-stall samples, with their three largest reasons."""
    rows = _rows(csv_text, header='"Address"')
    if not rows:
        return []
    total = "Warp Stall Sampling (All Samples)"
    key = total if total in rows[0] else next((k for k in rows[0] if "Sampling (All" in k), None)
    if key is None:
        return []
    rows.sort(key=lambda r: -(_num(r.get(key, "")) or 0))
    hot = []
    for r in rows[:n]:
        reasons = {k: _num(v) for k, v in r.items() if k.startswith("stall_") and "Not Issued" not in k}
        reasons = {k: v for k, v in reasons.items() if v}
        hot.append({"sass": r.get("Source", "")[:90], "samples": _num(r.get(key, "")),
                    "reasons": dict(sorted(reasons.items(), key=lambda kv: -kv[1])[:3])})
    return hot


def main() -> int:
    kernels = selected(sys.argv[1:])
    if "--target" in sys.argv[1:]:
        target(kernels)
        return 0
    from benchmarks.require_gpu import gpu_driver_present

    if not gpu_driver_present():
        print("ncu_kernels: profiles kernels on a CUDA GPU and this machine has none")
        return 2
    ncu = shutil.which("ncu") or next((p for p in ("/usr/local/cuda/bin/ncu",) if os.path.exists(p)), None)
    if ncu is None:
        print("ncu_kernels: no ncu on this machine")
        return 2
    from benchmarks.common import run_metadata, table, write_results

    with tempfile.TemporaryDirectory() as d:
        rep = os.path.join(d, "prof")
        regex = "regex:" + "|".join(sorted({k for _, k in kernels}))
        cmd = [ncu, "--clock-control", "none", "--profile-from-start", "off", "--set", "full",
               "--import-source", "no", "-k", regex, "-o", rep, "-f", sys.executable, "-m", "benchmarks.ncu_kernels",
               "--target", *sys.argv[1:]]
        r = subprocess.run(cmd, capture_output=True, text=True)
        print(r.stdout[-3000:], r.stderr[-3000:], flush=True)
        if r.returncode != 0 or not os.path.exists(rep + ".ncu-rep"):
            print(f"ncu_kernels: ncu failed (rc {r.returncode})")
            return 1
        details = subprocess.run([ncu, "-i", rep + ".ncu-rep", "--page", "details", "--csv", "--print-units", "base"],
                                 capture_output=True, text=True).stdout
        sources: list[str] = []
        rows = summarize(ncu, rep + ".ncu-rep", sources, details, kernels)
    out_dir = os.environ.get("OUT") or os.path.join("runs", "benchmarks")
    os.makedirs(out_dir, exist_ok=True)
    with gzip.open(os.path.join(out_dir, "ncu_details.csv.gz"), "wt") as f:
        f.write(details)
    with gzip.open(os.path.join(out_dir, "ncu_source.csv.gz"), "wt") as f:
        f.write("\n".join(sources))
    print("written:", write_results("ncu_kernels", {"meta": run_metadata(), "rows": rows}))
    for row in rows:
        for h in row["hot_sass"][:6]:
            print(f"  {row['name'][:34]:34} {h['samples']!s:>8} {h['sass'][:70]} {h['reasons']}")
    print(table(rows, ["name", *[c for c, _ in METRICS], "top_stalls"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
