"""The re-rank pool's top-k with its slot gather (``topk_slots``: one launch, a row of <= 16384 candidates in
registers) against the path it replaces in ``candidate_topk`` (``topk_rows`` + a torch gather of slot ids) and
against torch.topk + gather, in one run on one GPU, with the same-run ceilings.

    python -m benchmarks.topk_short        # < 60 s on an H200; JSON to $OUT (or runs/benchmarks/)

Cases (k = 2048, fp32 logits of pools with ~5% -1 slots at -inf): rows 8192 and 16384 x pools 4096 / 8192 / 16384,
random logits and heavy ties (logits rounded to ~9 values); a decode-sized batch (64 x 8192); and, on the
8192 x 8192 and 16384 x 16384 random cases, the warp counts of ``topk_slots_config`` against the others
(rows "warps=N"). Every case checks that the new kernel's output equals ``topk_slots_reference`` (slot ids in
pool order) on a subset of rows and that the current path selects the same sets; a case that does not is reported
as an error. TB/s = logits + slot ids read once / time; frac = of the same-run copy ceiling.
"""
from __future__ import annotations

import sys

import torch

from benchmarks.common import bench_ms, measure_ceilings, run_metadata, table, write_results
from indexcache.kernels.candidate_topk import topk_slots, topk_slots_reference
from indexcache.kernels.candidate_topk.triton import topk_slots_config
from indexcache.kernels.topk import topk_rows

K = 2048


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


def _case(R, c, ties, ceilings, warps=None):
    x, cand = _pools(R, c, ties)
    name = f"{R}x{c}{' ties' if ties else ''}"
    cfg = None
    if warps is not None:
        name += f" warps={warps}"
        cfg = dict(num_warps=warps, PB=128 * warps)
    row = {"name": name, "warps": warps or topk_slots_config(c)["num_warps"]}
    new = topk_slots(x, cand, K, config=cfg)
    sub = torch.unique(torch.cat([torch.arange(0, R, max(1, R // 48), device="cuda"),
                                  torch.tensor([R - 1], device="cuda")]))
    row["equals_reference"] = bool(torch.equal(new[sub], topk_slots_reference(x[sub], cand[sub], K)))
    if warps is None:
        row["same_sets_as_current"] = bool(torch.equal(_sets(new), _sets(current_path(x, cand))))
    if not (row["equals_reference"] and row.get("same_sets_as_current", True)):
        row["error"] = "selected sets differ"
    nbytes = R * c * 8
    ms = bench_ms(lambda: topk_slots(x, cand, K, config=cfg), warmup_ms=10, rep_ms=50)
    row.update(ms=ms, tbps=nbytes / ms / 1e9, frac=nbytes / ms / 1e9 / ceilings["copy_tbps"])
    if warps is None:
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
    cases = [(R, c, ties, None) for R in (8192, 16384) for c in (4096, 8192, 16384) for ties in (False, True)]
    cases.append((64, 8192, False, None))
    cases += [(8192, 8192, False, w) for w in (4, 8, 16) if w != topk_slots_config(8192)["num_warps"]]
    cases += [(16384, 16384, False, w) for w in (4, 8, 16) if w != topk_slots_config(16384)["num_warps"]]
    rows = []
    for R, c, ties, warps in cases:
        try:
            rows.append(_case(R, c, ties, ceilings, warps))
        except Exception as e:  # noqa: BLE001 - report the case and go on
            rows.append({"name": f"{R}x{c}{' ties' if ties else ''}", "warps": warps,
                         "error": f"{type(e).__name__}: {e}"})
        print(rows[-1], flush=True)
    paths = write_results("topk_short", {"meta": run_metadata(), "ceilings": ceilings, "k": K, "rows": rows})
    print("wrote", paths)
    print(table(rows, ["name", "warps", "ms", "ms_current", "ms_torch", "speedup_vs_current", "speedup_vs_torch",
                       "tbps", "frac", "equals_reference", "same_sets_as_current", "error"]))
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
