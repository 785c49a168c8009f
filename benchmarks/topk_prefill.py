"""The one-launch prefill top-k (``topk_rows`` for R > 64 rows, ``_topk1_kernel``) against its run-52 version, in
one run on one GPU, with the same-run ceilings.

    python -m benchmarks.topk_prefill        # ~60 s on an H200; JSON to $OUT (or runs/benchmarks/)

Cases (k = 2048, fp32 logits): 4096 x 200K causal (the last rows of a 200K prefill), 2048 x 200K full rows,
8192 x 8192 (short rows: an R layer's candidate pool), 256 x 1M. Effective TB/s = bytes of the valid windows
read once / time; frac = of the same-run copy ceiling. Both kernels must select the same sets, and the current
one the reference's (``topk_rows_reference`` on a subset of rows); a case that does not is reported as an error.
The run-52 kernel lives here only for this comparison (its helpers are unchanged in ``topk/triton.py``).
"""
from __future__ import annotations

import sys

import torch
import triton
import triton.language as tl

from benchmarks.common import bench_ms, measure_ceilings, run_metadata, table, write_results
from indexcache.kernels.topk import bracket_stats, topk_rows, topk_rows_reference
from indexcache.kernels.topk.triton import _kth, _scan_block, _select_write1

K = 2048


@triton.jit(do_not_specialize=["stride_r", "k", "cap"])
def _topk1_run52_kernel(x_ptr, stride_r, starts, ends, ctr, out, scr, k, cap, E: tl.constexpr, T: tl.constexpr,
                        V: tl.constexpr, SB: tl.constexpr, NTMAX: tl.constexpr, FB: tl.constexpr,
                        NBIN: tl.constexpr, ASM: tl.constexpr):
    r = tl.program_id(0)
    st = tl.load(starts + r)
    en = tl.load(ends + r)
    L = tl.maximum(en - st, 0)
    fb = r.to(tl.int64) * stride_r
    row = x_ptr + fb
    outr = out + r.to(tl.int64) * k
    scrr = scr + r.to(tl.int64) * cap
    lo = tl.zeros([], tl.int32) - 2139095040
    sampled = L > cap
    if sampled:
        nt = tl.minimum(tl.minimum(tl.cdiv(32 * L, k * SB), L // (4 * SB)), NTMAX)
        ns = tl.maximum(nt, 1) * SB
        q = tl.maximum(tl.sqrt((k * cap).to(tl.float32)) * ns.to(tl.float32) / L.to(tl.float32), 1.0)
        tq, rem, eq, cnt = _kth(row, ns, st, L // ns, q.to(tl.int32), 0, 2, False, SB, NBIN)
        if cnt >= q.to(tl.int32):
            lo = tl.maximum(tq, lo)
    BLOCK: tl.constexpr = E * T * V
    f0 = fb + st
    f1 = fb + en
    a0 = (f0 // V) * V
    nblk = tl.cdiv(tl.maximum(f1 - a0, 0), BLOCK)
    wr = tl.zeros([], tl.int32)
    if nblk > 0:
        wr = _scan_block(x_ptr, a0, f0, f1, (a0 - fb).to(tl.int32), lo, scrr, wr, cap, E, T, V, True, ASM)
    for base in range(a0 + BLOCK, a0 + (nblk - 1) * BLOCK, BLOCK):
        wr = _scan_block(x_ptr, base, f0, f1, (base - fb).to(tl.int32), lo, scrr, wr, cap, E, T, V, False, ASM)
    if nblk > 1:
        base = a0 + (nblk - 1) * BLOCK
        wr = _scan_block(x_ptr, base, f0, f1, (base - fb).to(tl.int32), lo, scrr, wr, cap, E, T, V, True, ASM)
    good = (wr <= cap) & ((sampled == 0) | (wr >= k))
    if good:
        m = _select_write1(scrr, wr, st, 1, k, outr, 0, FB, NBIN)
    else:
        m = _select_write1(row, L, st, 1, k, outr, 1, FB, NBIN)
    tl.store(ctr + r * 2 + 0, tl.where(good, wr, 2147483647).to(tl.int64))
    tl.store(ctr + r * 2 + 1, tl.where(good, wr, m).to(tl.int64))
    ar = tl.arange(0, FB)
    for off in range(m, k, FB):
        tl.store(outr + off + ar, tl.full([FB], -1, tl.int32), mask=off + ar < k)


def run52_topk(x, k, ends):
    """The run-52 launch: one program per row in row order, 8 warps, 4096-entry scan blocks, 1024-entry tiles."""
    R = x.shape[0]
    cap = max(4096, 4 * triton.next_power_of_2(k))
    out = torch.empty((R, k), dtype=torch.int32, device=x.device)
    ctr = torch.empty((R, 2), dtype=torch.int64, device=x.device)
    scr = torch.empty((R, cap), dtype=torch.int64, device=x.device)
    starts = torch.zeros(R, dtype=torch.int32, device=x.device)
    _topk1_run52_kernel[(R,)](x, x.stride(0), starts, ends, ctr, out, scr, k, cap, E=4, T=256, V=4, SB=1024,
                              NTMAX=16, FB=1024, NBIN=64, ASM=True, num_warps=8)
    return out


def _sets(idx):
    return idx.sort(dim=1).values


def _case(name, R, N, causal, ceilings):
    torch.manual_seed(0)
    x = torch.randn(R, N, device="cuda")
    if causal:      # the last R query rows of a causal prefill over N keys: row i sees N - R + i + 1 keys
        ends = torch.arange(N - R + 1, N + 1, device="cuda", dtype=torch.int32)
        x.masked_fill_(torch.arange(N, device="cuda")[None, :] >= ends[:, None], float("-inf"))
    else:
        ends = torch.full((R,), N, device="cuda", dtype=torch.int32)
    nbytes = ends.double().sum().item() * 4
    row = {"name": name, "shape": f"{R}x{N}{' causal' if causal else ''} k={K} fp32"}
    stats = {}
    new = topk_rows(x, K, row_end=ends, stats=stats)
    old = run52_topk(x, K, ends)
    sub = torch.unique(torch.cat([torch.arange(0, R, max(1, R // 64), device="cuda"),
                                  torch.tensor([R - 1], device="cuda")]))
    ref = topk_rows_reference(x[sub], K, row_end=ends[sub])
    row["same_sets_as_run52"] = bool(torch.equal(_sets(new), _sets(old)))
    row["same_sets_as_reference"] = bool(torch.equal(_sets(new[sub]), _sets(ref)))
    row["fallback_rows"] = bracket_stats(stats, K)[0]
    if not (row["same_sets_as_run52"] and row["same_sets_as_reference"]):
        row["error"] = "selected sets differ"
    ms_new = bench_ms(lambda: topk_rows(x, K, row_end=ends))
    ms_old = bench_ms(lambda: run52_topk(x, K, ends))
    ms_torch = bench_ms(lambda: torch.topk(x, K, dim=1, sorted=False))
    row.update(ms=ms_new, ms_run52=ms_old, ms_torch_topk=ms_torch, tbps=nbytes / ms_new / 1e9,
               tbps_run52=nbytes / ms_old / 1e9, speedup=ms_old / ms_new,
               frac=nbytes / ms_new / 1e9 / ceilings["copy_tbps"])
    del x
    torch.cuda.empty_cache()
    return row


def main() -> int:
    if not torch.cuda.is_available():
        print("benchmarks.topk_prefill needs a CUDA GPU")
        return 2
    ceilings = measure_ceilings()
    print("ceilings:", ceilings, flush=True)
    rows = []
    for args in (("200K causal", 4096, 200_000, True), ("200K full", 2048, 200_000, False),
                 ("8K short", 8192, 8192, False), ("1M", 256, 1 << 20, False)):
        try:
            rows.append(_case(*args, ceilings))
        except Exception as e:  # noqa: BLE001 - report the case and go on
            rows.append({"name": args[0], "error": f"{type(e).__name__}: {e}"})
        print(rows[-1], flush=True)
    paths = write_results("topk_prefill", {"meta": run_metadata(), "ceilings": ceilings, "rows": rows})
    print("wrote", paths)
    print(table(rows, ["name", "shape", "ms", "ms_run52", "ms_torch_topk", "speedup", "tbps", "tbps_run52", "frac",
                       "fallback_rows", "same_sets_as_run52", "same_sets_as_reference", "error"]))
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
