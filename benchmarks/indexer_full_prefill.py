"""The whole indexer stage of one causal 200K-token prefill (logits + exact top-k, bounded workspace): time and
peak extra memory against the configured workspace, at both indexer sizes, with same-run ceilings.

    python -m benchmarks.indexer_full_prefill
"""
from benchmarks import kernels_indexer as ki
from benchmarks.common import measure_ceilings, run_metadata, table, write_results


def main():
    ceil = measure_ceilings()
    ki.SZ = ki.SIZES["full"]
    rows = []
    ki.bench_full_prefill(rows, ceil, False, None)
    print(table(rows, ["name", "shape", "ms", "tflops", "frac_fp8_cublas", "peak_extra_gib", "chunks"]))
    write_results("indexer_full_prefill", {"meta": run_metadata(), "ceilings": ceil, "workspace_gib": 2.0,
                                           "rows": rows})


if __name__ == "__main__":
    main()
