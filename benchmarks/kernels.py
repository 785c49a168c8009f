"""One command for every kernel benchmark: ceilings once, then the indexer cases (if present) and ours.

    python -m benchmarks.kernels [--quick]
"""
from __future__ import annotations

import argparse
import importlib
import inspect

from benchmarks.common import measure_ceilings, run_metadata, table, write_results


def _score(row: dict, ceilings: dict) -> dict:
    if "frac" in row or "error" in row:
        return row
    for own, ceiling in (("frac_fp8_cublas", "fp8_matmul"), ("frac_copy", "copy")):  # rows that scored themselves
        if row.get(own) is not None:
            row["frac"], row["ceiling"] = row[own], ceiling
            return row
    if row.get("tbps") is not None:
        row["frac"] = row["tbps"] / ceilings["copy_tbps"]
    elif row.get("tflops") is not None:
        fp8 = "fp8" in (str(row.get("name", "")) + str(row.get("shape", ""))).lower()
        row["frac"] = row["tflops"] / ceilings["fp8_matmul_tflops" if fp8 else "bf16_matmul_tflops"]
    return row


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--skip-indexer", action="store_true", help="only the top-k / sparse MLA cases")
    args = ap.parse_args(argv)
    ceilings = measure_ceilings()
    print("ceilings:", {k: (round(v, 1) if isinstance(v, float) else v) for k, v in ceilings.items()})
    rows = []
    try:
        indexer = importlib.import_module("benchmarks.kernels_indexer")
    except ModuleNotFoundError:
        indexer = None
    if indexer is not None and not args.skip_indexer:
        try:
            kw = {"ceilings": ceilings} if "ceilings" in inspect.signature(indexer.run).parameters else {}
            rows += [_score(dict(r), ceilings) for r in indexer.run(quick=args.quick, **kw)]
        except Exception as e:
            rows.append({"name": "kernels_indexer", "error": repr(e)[:300]})
    from benchmarks import kernels_attention
    rows += [_score(r, ceilings) for r in kernels_attention.run(ceilings, quick=args.quick)]
    print(table(rows, ["name", "shape", "ms", "us", "tflops", "tbps", "frac", "speedup", "eager_ms", "error"]))
    paths = write_results("kernels", {"meta": run_metadata(), "ceilings": ceilings, "rows": rows})
    print("wrote", paths)


if __name__ == "__main__":
    main()
