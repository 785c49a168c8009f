"""Re-rank (R) layer scoring on the GPU: ``candidate_topk`` over per-query pools of c candidates against an F
layer's full selection (``indexer_topk_prefill``) for the same query rows at a long context. Also checks the
kernel against the PyTorch reference on the GPU (selected-score agreement).

    python -m benchmarks.kernels_rerank            # ~1-2 minutes of H200 time
    python -m benchmarks.kernels_rerank --quick    # shorter context

Rows: one prefill chunk of T query rows at the end of a context of S tokens, H indexer heads; the R layer's pool is
c random earlier slots per row (the engine passes the F layer's top-c). FLOPs: 2 * scored pairs * H * 128; bytes:
132 B per gathered candidate key. Every ratio is against ceilings measured in the same process.
"""
from __future__ import annotations

import argparse
import sys

import torch

from benchmarks.common import bench_ms, measure_ceilings, run_metadata, table, write_results
from indexcache.kernels import indexer as ix
from indexcache.kernels.candidate_topk import candidate_logits, candidate_topk, candidate_topk_reference
from indexcache.kernels.kv_store import new_indexer_cache, store_indexer_k
from indexcache.kernels.topk import topk_rows

DEV = "cuda"


def case(t: int, s: int, h: int, c: int, seed: int = 0):
    g = torch.Generator(device=DEV).manual_seed(seed)
    q = torch.randn(t, h, 128, device=DEV, dtype=torch.bfloat16, generator=g)
    w = torch.randn(t, h, device=DEV, dtype=torch.float32, generator=g)
    k = torch.randn(s, 128, device=DEV, dtype=torch.bfloat16, generator=g)
    q8, wf = ix.quantize_indexer_q(q, w)
    cache = new_indexer_cache(-(-s // 64), device=DEV)
    store_indexer_k(cache, torch.arange(s, device=DEV), k)
    # distinct candidates per row, all before the row's position (rows are the last t positions)
    cand = torch.rand(t, s - t, device=DEV, generator=g).topk(c, dim=1).indices.to(torch.int32)
    return q8, wf, cache, cand


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    s = 32768 if args.quick else 200_000
    t, k = 4096, 2048
    res = {"meta": run_metadata(), "ceilings": measure_ceilings(), "context": s, "rows": t, "topk": k, "cases": []}
    for h in (32, 64):
        q8, wf, cache, cand = case(t, s, h, 8192)
        # F layer: full selection over the context for the same rows (causal windows ending at each row)
        k8, ks = ix.quantize_indexer_k(torch.randn(s, 128, device=DEV, dtype=torch.bfloat16))
        ends = torch.arange(s - t + 1, s + 1, device=DEV, dtype=torch.int32)
        starts = torch.zeros(t, device=DEV, dtype=torch.int32)
        f_ms = bench_ms(lambda: ix.indexer_topk_prefill(q8, wf, k8, ks, starts, ends, k, topk_fn=topk_rows))
        f_pairs = int((ends - starts).sum())
        for c in (2048, 4096, 8192):
            cd = cand[:, :c].contiguous()
            n = 512  # the reference materialises fp32 keys per candidate: check a slice of the rows
            got = candidate_topk(q8[:n], wf[:n], cache, cd[:n], k)
            ref = candidate_topk_reference(q8[:n], wf[:n], cache, cd[:n], k)
            lg = candidate_logits(q8[:n], wf[:n], cache, cd[:n])
            # selected scores agree (sets may differ only among exact ties)
            sg = torch.sort(lg.gather(1, _cols(cd[:n], got)), 1).values
            sr = torch.sort(lg.gather(1, _cols(cd[:n], ref)), 1).values
            exact = bool(torch.allclose(sg, sr, rtol=1e-6, atol=1e-6))
            logit_ms = bench_ms(lambda: candidate_logits(q8, wf, cache, cd))
            r_ms = bench_ms(lambda: candidate_topk(q8, wf, cache, cd, k))
            pairs = t * c
            tflops = 2 * pairs * h * 128 / (logit_ms * 1e-3) / 1e12
            gbs = pairs * 132 / (logit_ms * 1e-3) / 1e9
            res["cases"].append({"heads": h, "pool": c, "F_ms": f_ms, "F_pairs": f_pairs, "R_ms": r_ms,
                                 "R_logits_ms": logit_ms, "R_over_F": r_ms / f_ms, "logits_tflops": tflops,
                                 "gather_GBps": gbs, "selected_scores_match": exact})
    write_results("kernels_rerank", res)
    cols = ["heads", "pool", "F_ms", "R_ms", "R_logits_ms", "R_over_F", "logits_tflops", "gather_GBps",
            "selected_scores_match"]
    print(f"context {s}, {t} query rows, top-k {k}; ceilings {res['ceilings']}")
    print(table(res["cases"], cols))
    return 0 if all(c["selected_scores_match"] for c in res["cases"]) else 1


def _cols(cand: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
    """Column of each chosen slot id in its row's pool (candidates are distinct per row; pools here are never
    shorter than k, so no -1 is chosen)."""
    order = cand.long().argsort(1)
    srt = cand.long().gather(1, order)
    j = torch.searchsorted(srt, chosen.long().clamp(min=0))
    return order.gather(1, j.clamp(max=cand.shape[1] - 1))


if __name__ == "__main__":
    sys.exit(main())
