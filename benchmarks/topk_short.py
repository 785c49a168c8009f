"""The re-rank pool's top-k with its slot gather (``topk_slots``: one launch, a row of <= 16384 candidates in
registers) against the path it replaces in ``candidate_topk`` (``topk_rows`` + a torch gather of slot ids) and
against torch.topk + gather, in one run on one GPU, with the same-run ceilings.

    python -m benchmarks.topk_short        # < 60 s on an H200; JSON to $OUT (or runs/benchmarks/)

Cases (k = 2048, fp32 logits of pools with ~5% -1 slots at -inf): rows 8192 and 16384 x pools 4096 / 8192 / 16384
of random logits, and 8192 rows of heavy ties (logits rounded to ~9 values); a decode-sized batch (64 x 8192);
and, on the 8192 x 8192 and 16384 x 16384 random cases, other warp counts and bins per histogram round than
``topk_slots_config``'s (rows "num_warps=N" / "LB=B": 2^B bins; skipped when the run is past 40 s). Every case checks that the new kernel's output equals ``topk_slots_reference`` (slot ids in
pool order) on a subset of rows and that the current path selects the same sets; a case that does not is reported
as an error. TB/s = logits + slot ids read once / time; frac = of the same-run copy ceiling.
"""
from __future__ import annotations

import sys
import time

import torch

from benchmarks.common import bench_ms, measure_ceilings, run_metadata, table, write_results
from indexcache.kernels.candidate_topk import topk_slots, topk_slots_reference
from indexcache.kernels.candidate_topk.triton import topk_slots_config
from indexcache.kernels.topk import topk_rows

K = 2048
_SWEEP_UNTIL_S = 40     # the other-config rows only start while the run is younger than this (< 60 s in all)


def current_path(x, cand):
    """``candidate_topk``'s selection before ``topk_slots``: topk_rows, then the slot ids gathered by torch."""
    col = topk_rows(x, K)
    return torch.where(col < 0, -1, cand.gather(1, col.clamp(min=0).long()).to(torch.int32))


def torch_path(x, cand):
    return cand.gather(1, torch.topk(x, K, dim=1, sorted=False).indices)


def _pools(R, c, ties):
    g = torch.Generator(device="cuda").manual_seed(R + c + ties)
    x = torch.randn(R, c, device="cuda", generator=g)
    if ties:
        x = (x * 2).round()
    cand = torch.randint(0, 1 << 24, (R, c), device="cuda", generator=g, dtype=torch.int32)
    cand.masked_fill_(torch.rand(R, c, device="cuda", generator=g) < 0.05, -1)
    x.masked_fill_(cand < 0, float("-inf"))
    return x, cand


def _sets(s):
    return s.sort(dim=1).values


def _case(R, c, ties, ceilings, cfg=None):
    """One case at the default config, or (``cfg``: overrides of ``topk_slots_config``) the new kernel alone."""
    x, cand = _pools(R, c, ties)
    name = f"{R}x{c}{' ties' if ties else ''}"
    if cfg is not None:
        cfg = dict(cfg, PB=128 * cfg.get("num_warps", topk_slots_config(c)["num_warps"]))
        name += " " + ",".join(f"{k}={v}" for k, v in cfg.items() if k != "PB")
    full = dict(topk_slots_config(c), **(cfg or {}))
    row = {"name": name, "warps": full["num_warps"], "bins": 1 << full["LB"]}
    new = topk_slots(x, cand, K, config=cfg)
    sub = torch.unique(torch.cat([torch.arange(0, R, max(1, R // 48), device="cuda"),
                                  torch.tensor([R - 1], device="cuda")]))
    row["equals_reference"] = bool(torch.equal(new[sub], topk_slots_reference(x[sub], cand[sub], K)))
    if cfg is None:
        row["same_sets_as_current"] = bool(torch.equal(_sets(new), _sets(current_path(x, cand))))
    if not (row["equals_reference"] and row.get("same_sets_as_current", True)):
        row["error"] = "selected sets differ"
    nbytes = R * c * 8
    ms = bench_ms(lambda: topk_slots(x, cand, K, config=cfg), warmup_ms=10, rep_ms=50)
    row.update(ms=ms, tbps=nbytes / ms / 1e9, frac=nbytes / ms / 1e9 / ceilings["copy_tbps"])
    if cfg is None:
        row["ms_current"] = bench_ms(lambda: current_path(x, cand), warmup_ms=10, rep_ms=50)
        row["ms_torch"] = bench_ms(lambda: torch_path(x, cand), warmup_ms=10, rep_ms=50)
        row["speedup_vs_current"] = row["ms_current"] / ms
        row["speedup_vs_torch"] = row["ms_torch"] / ms
    del x, cand
    torch.cuda.empty_cache()
    return row


def main() -> int:
    if not torch.cuda.is_available():
        print("benchmarks.topk_short needs a CUDA GPU")
        return 2
    ceilings = measure_ceilings()
    print("ceilings:", ceilings, flush=True)
    cases = [(R, c, ties, None) for R in (8192, 16384) for c in (4096, 8192, 16384) for ties in (False, True)
             if R == 8192 or not ties]
    cases.append((64, 8192, False, None))
    cases += [(8192, 8192, False, cfg) for cfg in (dict(num_warps=4), dict(num_warps=16), dict(LB=5), dict(LB=8))]
    cases += [(16384, 16384, False, cfg) for cfg in (dict(num_warps=16), dict(LB=5))]
    rows = []
    t0 = time.perf_counter()
    for R, c, ties, cfg in cases:
        if cfg is not None and time.perf_counter() - t0 > _SWEEP_UNTIL_S:
            rows.append({"name": f"{R}x{c} {cfg}", "skipped": "time box"})
            continue
        try:
            rows.append(_case(R, c, ties, ceilings, cfg))
            rows[-1]["elapsed_s"] = round(time.perf_counter() - t0, 1)
        except Exception as e:  # noqa: BLE001 - report the case and go on
            rows.append({"name": f"{R}x{c}{' ties' if ties else ''} {cfg or ''}",
                         "error": f"{type(e).__name__}: {e}"})
        print(rows[-1], flush=True)
    paths = write_results("topk_short", {"meta": run_metadata(), "ceilings": ceilings, "k": K, "rows": rows})
    print("wrote", paths)
    print(table(rows, ["name", "warps", "bins", "ms", "ms_current", "ms_torch", "speedup_vs_current", "speedup_vs_torch",
                       "tbps", "frac", "equals_reference", "same_sets_as_current", "error", "skipped"]))
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
