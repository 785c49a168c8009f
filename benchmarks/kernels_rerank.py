"""Re-rank (R) layers on the GPU at a 200K context: checks, then times, in one run with same-run ceilings,

  1. the candidate-scoring kernel: the current one (``kernels.candidate_topk``: a program per query row, a
     pipelined loop over its pool) against the previous one (a program per 64 candidates that reloads q; kept
     here only for this comparison), logits of T rows x c candidates;
  2. the R-layer stage of one prefill chunk: q quantisation + candidate scoring + top-k (new and old kernel);
  3. the F-layer stage of the chunk at the end of the context (logits over up to 200K keys + selection): without a
     pool, with a pool as the engine now publishes it (``topk_and_pool_rows``: both from one read of each row;
     ``benchmarks.topk_prefill`` times that selection), and as it did before (``topk_rows`` and ``topk_pool_rows``: two passes over each row, kept
     here only for this comparison);
  4. decode, batch 1 at 200K (CUDA graphs): an F step with and without a pool (new: the pool as selected; old:
     sorted by column, which R layers needed while they broke ties by pool order), an R step (new and old
     kernel).

    python -m benchmarks.kernels_rerank            # ~2-3 minutes of H200 time
    python -m benchmarks.kernels_rerank --quick    # a 32K context

Checks (exit 1 if one fails): both kernels' logits against the PyTorch reference, the R top-k against the
reference top-k of the kernel's logits (ties by position), the pool and top-k sets of the F stage against
``topk_rows_reference`` / the F stage without a pool / the previous two selections, the decode pool against the
reference. Prefill estimates: an R layer's 200K prefill ~ (S / T)
chunks x its chunk time; an F layer's ~ (S / T) / 2 x its last-chunk time (the work grows with the context).
"""
from __future__ import annotations

import argparse
import sys

import torch
import triton
import triton.language as tl

from benchmarks.common import bench_ms, measure_ceilings, run_metadata, table, write_results
from indexcache.engine.attention_backend import _topk_then_pool
from indexcache.kernels import formats as F
from indexcache.kernels import indexer as ix
from indexcache.kernels.candidate_topk import (candidate_logits, candidate_logits_reference, candidate_topk,
                                               topk_slots, topk_slots_reference)
from indexcache.kernels.kv_store import new_indexer_cache, store_indexer_k
from indexcache.kernels.topk import (DecodeTopkWorkspace, pool_scratch_bytes_per_row, scratch_bytes_per_row,
                                     topk_pool_rows, topk_rows, topk_rows_decode)
from indexcache.kernels.topk.ops import plan_decode_launches
from indexcache.kernels.topk import topk_rows_reference

DEV = "cuda"
H, K = 32, 2048            # glm-4.7-flash's indexer heads and top-k
WORKSPACE = 1 << 30        # the engine's default workspace_bytes
ROWS = (8192, 16384)       # prefill chunk rows of the R stage
POOLS = (8192, 4096)       # pool sizes c (the default 4 x top-k, and 2 x)
F_ROWS = 8192              # the F stage's chunk


# ------------------------------------------------------------------ the previous kernel and pool (comparison only)
@triton.jit(do_not_specialize=["C"])
def _old_candidate_kernel(q_ptr, w_ptr, kc8_ptr, kcs_ptr, cand_ptr, out_ptr, C,
                          H: tl.constexpr, HP: tl.constexpr, BC: tl.constexpr):
    D: tl.constexpr = 128
    t = tl.program_id(0)
    blk = tl.program_id(1)
    offs_c = blk * BC + tl.arange(0, BC)
    cmask = offs_c < C
    slot = tl.load(cand_ptr + t.to(tl.int64) * C + offs_c, mask=cmask, other=-1).to(tl.int64)
    valid = slot >= 0
    s = tl.where(valid, slot, 0)
    base = (s // 64) * 8448
    off = s % 64
    offs_d = tl.arange(0, D)
    k = tl.load(kc8_ptr + (base + off * D)[:, None] + offs_d[None, :], mask=valid[:, None], other=0.0)
    ks = tl.load(kcs_ptr + (base // 4 + 8192 // 4 + off), mask=valid, other=0.0)
    offs_h = tl.arange(0, HP)
    hmask = offs_h < H
    q = tl.load(q_ptr + (t.to(tl.int64) * H + offs_h[:, None]) * D + offs_d[None, :], mask=hmask[:, None], other=0.0)
    w = tl.load(w_ptr + t.to(tl.int64) * H + offs_h, mask=hmask, other=0.0)
    acc = tl.dot(k, tl.trans(q))
    lg = tl.sum(tl.maximum(acc, 0.0) * w[None, :], axis=1) * ks
    lg = tl.where(valid, lg, float("-inf"))
    tl.store(out_ptr + t.to(tl.int64) * C + offs_c, lg, mask=cmask)


def old_logits(q8, w, cache, cand):
    t, h, _ = q8.shape
    c = cand.shape[1]
    out = torch.empty(t, c, device=q8.device, dtype=torch.float32)
    _old_candidate_kernel[(t, triton.cdiv(c, 64))](q8, w, cache.view(torch.float8_e4m3fn), cache.view(torch.float32),
                                                    cand, out, c, H=h, HP=max(16, h), BC=64, num_warps=4,
                                                    num_stages=2)
    return out


def old_topk(q8, w, cache, cand, k):
    col = topk_rows(old_logits(q8, w, cache, cand), k)
    return torch.where(col < 0, -1, cand.gather(1, col.clamp(min=0).long()).to(torch.int32))


def two_selections(k: int):
    """The previous F-layer pool selection: [top-k | top-c] by ``topk_rows`` and ``topk_pool_rows``, two passes
    over each row (the engine now takes the top-k from the pool)."""
    def select(logits, n, *, row_start=None, row_end=None):
        return torch.cat([topk_rows(logits, k, row_start=row_start, row_end=row_end),
                          topk_pool_rows(logits, n - k, row_start=row_start, row_end=row_end)], 1)

    select.scratch_bytes_per_row = lambda width, n: (scratch_bytes_per_row(k, n) + pool_scratch_bytes_per_row(
        width - k, n) + 4 * width)
    return select


def sorted_pool(pool):
    """The previous decode pool: sorted by column, -1 last (R layers broke their ties by pool order then)."""
    big = torch.iinfo(torch.int32).max
    s = torch.where(pool < 0, big, pool).sort(1).values
    return s.masked_fill_(s == big, -1)


# --------------------------------------------------------------------------------------------------- helpers
def graph_ms(fn) -> float:
    """Replay time of ``fn`` captured in a CUDA graph (decode runs in graphs)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return bench_ms(g.replay)


def sets_equal(a, b) -> bool:
    return torch.equal(a.sort(1).values, b.sort(1).values)


def context(s: int, g):
    """s keys: a paged FP8 cache (pages in a random order, as the engine's block tables give them), the slot of
    each position, and the same keys contiguous (the F layer's gathered keys)."""
    pages = -(-s // 64)
    kb = torch.randn(s, 128, device=DEV, dtype=torch.bfloat16, generator=g)
    cache = new_indexer_cache(pages + 1, device=DEV)
    bt = torch.randperm(pages, device=DEV, generator=g).to(torch.int32)
    pos = torch.arange(s, device=DEV)
    slot = (bt[pos // 64] * 64 + pos % 64).to(torch.int32)
    store_indexer_k(cache, slot, kb)
    k8, ks = F.gather_indexer_k(cache, slot)
    return cache, bt, slot, k8, ks


def queries(t, g):
    return (torch.randn(t, H, 128, device=DEV, dtype=torch.bfloat16, generator=g),
            torch.randn(t, H, device=DEV, dtype=torch.float32, generator=g))


def pools(t, c, s, slot, g):
    """Per-row pools of c positions before the chunk (rows are the last t positions of s): (slots, positions)."""
    pos = torch.randint(0, s - t, (t, c), device=DEV, generator=g, dtype=torch.int32)
    return slot[pos], pos


def decode_parts(qb, wb, cache, table_, cl, s, c, cd, ws) -> list[dict]:
    """Each launch group of the F-with-pool and R decode steps timed alone in a CUDA graph (batch 1)."""
    q8, wf = ix.quantize_indexer_q(qb, wb)
    lg = ix.indexer_logits_decode(q8, wf, cache, table_, cl, s)
    pool = plan_decode_launches(lg, c, None, cl, workspace=ws)[1]()
    lgc = candidate_logits(q8, wf, cache, cd)
    col = topk_rows(lgc, K)
    wsc = DecodeTopkWorkspace.new(1, c, DEV)
    parts = {"quantize q": lambda: ix.quantize_indexer_q(qb, wb),
             "F logits": lambda: ix.indexer_logits_decode(q8, wf, cache, table_, cl, s),
             "F top-k (decode kernel)": lambda: topk_rows_decode(lg, K, row_end=cl, workspace=ws),
             "F pool (decode kernel)": lambda: plan_decode_launches(lg, c, None, cl, workspace=ws)[1](),
             "F pool sort by column (torch; before)": lambda: sorted_pool(pool),
             "R candidate logits": lambda: candidate_logits(q8, wf, cache, cd),
             "R top-k (topk_slots, ties by position)": lambda: topk_slots(lgc, cd, K, tie_ids=cd),
             "R top-k (topk_slots, ties by pool entry)": lambda: topk_slots(lgc, cd, K),
             "R top-k (topk_rows)": lambda: topk_rows(lgc, K),
             "R top-k (decode kernel)": lambda: topk_rows_decode(lgc, K, workspace=wsc),
             "R slot gather": lambda: torch.where(col < 0, -1, cd.gather(1, col.clamp(min=0).long()))}
    return [{"part": name, "pool": c, "us": 1000 * graph_ms(fn)} for name, fn in parts.items()]


# ------------------------------------------------------------------------------------------------------ main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--context", type=int, default=0, help="keys in the context (default 200K, 32K with --quick)")
    args = ap.parse_args(argv)
    s = args.context or (32768 if args.quick else 200_000)
    g = torch.Generator(device=DEV).manual_seed(0)
    res = {"meta": run_metadata(), "ceilings": measure_ceilings(), "context": s, "heads": H, "topk": K,
           "checks": {}, "kernel": [], "stages": [],
           "decode_parts": []}
    chk = res["checks"]
    cache, bt, slot, k8, ks = context(s, g)

    # ---- checks: logits (both kernels) and the R top-k against the reference, on 256 rows of distinct pools
    n = 256
    qb, wb = queries(n, g)
    q8, wf = ix.quantize_indexer_q(qb, wb)
    cd = torch.rand(n, s - max(ROWS), device=DEV, generator=g).topk(POOLS[0], dim=1).indices
    cd = slot[cd].to(torch.int32)
    cd[:, 5::97] = -1
    ref = candidate_logits_reference(q8, wf, cache, cd)
    fin = cd >= 0
    for name, got in (("new", candidate_logits(q8, wf, cache, cd)), ("old", old_logits(q8, wf, cache, cd))):
        # error against each row's largest |logit|: FP8 wgmma accumulates with a shortened mantissa
        scale = ref.masked_fill(~fin, 0).abs().amax(1, keepdim=True)
        err = float(((got - ref).masked_fill(~fin, 0).abs() / scale).max())
        chk[f"{name}_logits_rel_err"] = err
        chk[f"{name}_logits_ok"] = bool(err < 2e-3 and torch.equal(got == float("-inf"), ~fin))
    # the R top-k: exactly the reference top-k of the kernel's own logits, ties by position
    lg = candidate_logits(q8, wf, cache, cd)
    pos = torch.randperm(s, device=DEV, generator=g)[:cd.shape[1]].to(torch.int32).expand(n, -1).contiguous()
    exp = topk_slots_reference(lg, cd, K, pos)
    chk["rerank_topk_equals_reference"] = torch.equal(candidate_topk(q8, wf, cache, cd, K, tie_ids=pos), exp)
    del cd, ref, lg, exp, pos

    # ---- 1 + 2: the kernel and the R-layer stage, T rows x c candidates
    for t in ROWS:
        qb, wb = queries(t, g)
        for c in POOLS:
            cd, pos = pools(t, c, s, slot, g)
            q8, wf = ix.quantize_indexer_q(qb, wb)
            new_ms = bench_ms(lambda: candidate_logits(q8, wf, cache, cd))
            old_ms = bench_ms(lambda: old_logits(q8, wf, cache, cd))
            fl = 2 * t * c * H * 128
            res["kernel"].append({"rows": t, "pool": c, "old_ms": old_ms, "new_ms": new_ms, "speedup": old_ms / new_ms,
                                  "new_tflops": fl / new_ms / 1e9, "old_tflops": fl / old_ms / 1e9,
                                  "new_gather_TBps": t * c * 132 / new_ms / 1e9})
            r_new = bench_ms(lambda: candidate_topk(*ix.quantize_indexer_q(qb, wb), cache, cd, K, tie_ids=pos))
            r_old = bench_ms(lambda: old_topk(*ix.quantize_indexer_q(qb, wb), cache, cd, K))
            res["stages"].append({"stage": "R prefill", "rows": t, "pool": c, "old_ms": r_old, "new_ms": r_new,
                                  "est_200K_prefill_ms": r_new * s / t, "old_est_200K_prefill_ms": r_old * s / t})
            del cd, pos
        del qb, wb
    torch.cuda.empty_cache()

    # ---- 3: the F-layer stage, the chunk of t rows at the end of the context
    t = F_ROWS
    qb, wb = queries(t, g)
    q8, wf = ix.quantize_indexer_q(qb, wb)
    starts = torch.zeros(t, dtype=torch.int32, device=DEV)
    ends = torch.arange(s - t + 1, s + 1, device=DEV, dtype=torch.int32)
    plain = lambda: ix.indexer_topk_prefill(q8, wf, k8, ks, starts, ends, K, workspace_bytes=WORKSPACE,  # noqa: E731
                                            topk_fn=topk_rows)
    f_ms = bench_ms(plain)
    res["stages"].append({"stage": "F prefill, no pool", "rows": t, "pool": 0, "new_ms": f_ms,
                          "est_200K_prefill_ms": f_ms * s / t / 2})
    top = plain()
    for c in POOLS:
        new = lambda: ix.indexer_topk_prefill_two_pass(q8, wf, k8, ks, starts, ends, K + c,  # noqa: E731
                                                      workspace_bytes=WORKSPACE, topk_fn=_topk_then_pool(K))
        sel = new()
        chk[f"F_pool{c}_topk_equals_no_pool"] = sets_equal(sel[:, :K], top)
        rows = torch.arange(0, t, t // 4, device=DEV)  # the reference sorts whole rows: a few of them
        lg = ix.indexer_logits(q8[rows], wf[rows], k8, ks, starts[rows], ends[rows])
        chk[f"F_pool{c}_pool_equals_reference"] = sets_equal(sel[rows, K:],
                                                             topk_rows_reference(lg, c, row_end=ends[rows]))
        new_ms = bench_ms(new, warmup_ms=1, rep_ms=50)
        old = lambda: ix.indexer_topk_prefill_two_pass(q8, wf, k8, ks, starts, ends, K + c,  # noqa: E731
                                                      workspace_bytes=WORKSPACE, topk_fn=two_selections(K))
        prev = old()
        chk[f"F_pool{c}_same_sets_as_before"] = sets_equal(prev[:, :K], sel[:, :K]) and sets_equal(prev[:, K:],
                                                                                                  sel[:, K:])
        del prev
        old_ms = bench_ms(old, warmup_ms=1, rep_ms=50)
        res["stages"].append({"stage": "F prefill, pool", "rows": t, "pool": c, "old_ms": old_ms, "new_ms": new_ms,
                              "est_200K_prefill_ms": new_ms * s / t / 2,
                              "old_est_200K_prefill_ms": old_ms * s / t / 2})
        del sel, lg
    del qb, wb, q8, wf, top
    torch.cuda.empty_cache()

    # ---- 4: decode, batch 1 at s keys (CUDA graphs)
    qb, wb = queries(1, g)
    table_ = bt[None].contiguous()
    cl = torch.full((1,), s, dtype=torch.int32, device=DEV)
    ws = DecodeTopkWorkspace.new(1, table_.shape[1] * 64, DEV)

    def f_step(pool, old=False):
        def step():
            q8, wf = ix.quantize_indexer_q(qb, wb)
            lg = ix.indexer_logits_decode(q8, wf, cache, table_, cl, s)
            top = topk_rows_decode(lg, K, row_end=cl, workspace=ws)
            if not pool:
                return top
            cand = topk_pool_rows(lg, pool, row_end=cl, workspace=ws)
            return top, (sorted_pool(cand) if old else cand)
        return step

    f0 = graph_ms(f_step(0))
    res["stages"].append({"stage": "F decode, no pool", "rows": 1, "pool": 0, "new_ms": f0})
    q8, wf = ix.quantize_indexer_q(qb, wb)
    lg = ix.indexer_logits_decode(q8, wf, cache, table_, cl, s)
    for c in POOLS:
        _, pool = f_step(c)()
        chk[f"decode_pool{c}_equals_reference"] = sets_equal(pool, topk_rows_reference(lg, c, row_end=cl))
        cd = pool[:, torch.randperm(c, device=DEV, generator=g)]  # the R layer's pool (order as published)
        res["stages"].append({"stage": "F decode, pool", "rows": 1, "pool": c, "old_ms": graph_ms(f_step(c, True)),
                              "new_ms": graph_ms(f_step(c))})
        r_new = graph_ms(lambda: candidate_topk(*ix.quantize_indexer_q(qb, wb), cache, cd, K, tie_ids=cd))
        r_old = graph_ms(lambda: old_topk(*ix.quantize_indexer_q(qb, wb), cache, cd, K))
        res["stages"].append({"stage": "R decode", "rows": 1, "pool": c, "old_ms": r_old, "new_ms": r_new})
        res["decode_parts"] += decode_parts(qb, wb, cache, table_, cl, s, c, cd, ws)

    write_results("kernels_rerank", res)
    print(table(res["decode_parts"], ["part", "pool", "us"]))
    print(f"context {s}, H={H}, top-k {K}; ceilings {res['ceilings']}")
    print("checks:", chk)
    print(table(res["kernel"], ["rows", "pool", "old_ms", "new_ms", "speedup", "new_tflops", "old_tflops",
                                "new_gather_TBps"]))
    print(table(res["stages"], ["stage", "rows", "pool", "old_ms", "new_ms", "est_200K_prefill_ms",
                                "old_est_200K_prefill_ms"]))
    ok = all(v for name, v in chk.items() if not name.endswith("rel_err"))
    print("all checks passed" if ok else "CHECK FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
