"""Sparse MLA prefill over a bf16 or an FP8 latent cache, variants timed in one run: 8192 queries at the end of a
200K context, top-k 2048, 20 heads (glm-4.7-flash-dsa) and 128 heads (DeepSeek-V3.2). FP8 rows: "fp8 via decode"
is the engine's FP8 prefill path before kv_format="fp8" existed (sparse_mla_decode: gather + dequantise the
selected rows into a bf16 scratch, then the bf16 attention), the others sparse_mla_prefill(kv_format="fp8") at
launch configs; "fp8 dequant" dequantises all 200K rows into a bf16 copy, then runs the bf16-cache kernel (timed
together; the engine's FP8-cache prefill does this over a sequence's context rows); "fp8 gluon" is sparse_mla_prefill(kv_format="fp8", backend="gluon") (the Hopper Gluon kernel:
cp.async ring + wgmma overlapped with the dequantisation; it takes no config). FP8 rows are checked against the
reference on the dequantised rows.

    python -m benchmarks.sparse_mla_prefill [--quick] [--heads 20]   # ~1-2 min on an H200 (compiles included);
                                                                     # --heads: only that head count's rows

Index sets: "random" (uniform over the context: what random weights give, the worst case for L2) and "mix", a
synthetic stand-in for trained top-k sets: per query 64 sinks (the first tokens), the 256 tokens before it, and 27
far blocks of 64 consecutive tokens, drawn per group of 64 neighbouring queries with a quarter of each query's blocks
redrawn (so neighbours share most of their far rows). "sorted": the same sets in ascending token order, so programs
running at the same time walk the cache together and can share its rows in L2. Each variant is checked against the PyTorch reference on 32
queries before it is timed. FLOP = 2 * T * topk * h * (576 + 512); TB/s = gathered rows (T * topk * 1152 B, 656 B for FP8) / time.
"""
from __future__ import annotations

import sys

import torch

from benchmarks.common import bench_ms, measure_ceilings, run_metadata, table, write_results
from indexcache.kernels.sparse_mla import (quantize_latent_fp8_reference, sparse_mla_decode, sparse_mla_prefill,
                                           sparse_mla_prefill_reference)

CTX, K, SCALE = 200_000, 2048, 0.1352
# (label, h, cache, config): cache "bf16", "fp8" (sparse_mla_prefill kv_format="fp8") or "fp8 via decode"; config
# overrides the launch parameters, so a candidate launch is timed beside the production one in the same run; the
# first row of each h is the baseline of speedup_vs_base
VARIANTS = [
    ("production launch", 20, "bf16", None),
    ("fp8 via decode (old path)", 20, "fp8 via decode", None),
    ("fp8 triton", 20, "fp8", None),
    ("fp8 gluon (auto on Hopper)", 20, "fp8 gluon", None),
    ("fp8 dequant all rows + bf16 kernel", 20, "fp8 dequant", None),
    ("production launch", 128, "bf16", None),
    ("fp8 triton", 128, "fp8", None),
    ("fp8 via decode (engine > 32 heads)", 128, "fp8 via decode", None),
    ("fp8 dequant all rows + bf16 kernel", 128, "fp8 dequant", None),
]


def run(cache: str, q, kv, kv8, idx, cfg):
    if cache == "bf16":
        return sparse_mla_prefill(q, kv, idx, SCALE, config=cfg)
    if cache == "fp8":
        return sparse_mla_prefill(q, kv8, idx, SCALE, kv_format="fp8", config=cfg, backend="triton")
    if cache == "fp8 gluon":
        return sparse_mla_prefill(q, kv8, idx, SCALE, kv_format="fp8", config=cfg, backend="gluon")
    if cache == "fp8 dequant":
        return sparse_mla_prefill(q, kv8, idx, SCALE, kv_format="fp8", config=cfg, backend="dequant")
    return sparse_mla_decode(q, kv8.view(-1, 64, 656), idx, SCALE, kv_format="fp8")


def index_sets(T: int, device="cuda") -> dict:
    g = torch.Generator(device=device).manual_seed(0)
    pos = torch.arange(CTX - T, CTX, device=device)                                    # query positions
    rand = torch.randint(0, CTX, (T, K), device=device, generator=g)
    sinks = torch.arange(64, device=device).expand(T, 64)
    recent = pos[:, None] - 1 - torch.arange(256, device=device)[None, :]
    nblk = (K - 64 - 256) // 64                                                         # 27 far blocks
    far_hi = (CTX - T - 256) // 64
    group = torch.randint(1, far_hi, (T // 64 + 1, nblk), device=device, generator=g)
    blk = group.repeat_interleave(64, dim=0)[:T]
    redraw = torch.rand(T, nblk, device=device, generator=g) < 0.25
    blk = torch.where(redraw, torch.randint(1, far_hi, (T, nblk), device=device, generator=g), blk)
    far = (blk[:, :, None] * 64 + torch.arange(64, device=device)).reshape(T, -1)
    mix = torch.cat([sinks, recent, far], dim=1)
    sets = {"random": rand.to(torch.int32).contiguous(), "mix": mix.to(torch.int32).contiguous()}
    for name in list(sets):                  # the same sets in ascending token order (the engine may sort them)
        sets[name + " sorted"] = sets[name].sort(dim=1).values.contiguous()
    return sets


def main(quick: bool = False, heads: int | None = None) -> int:
    T = 2048 if quick else 8192
    ceilings = measure_ceilings()
    kv = torch.randn(CTX, 576, device="cuda", dtype=torch.bfloat16)
    kv8 = quantize_latent_fp8_reference(kv.float())                       # 200K rows: a multiple of the 64-row page
    sets = index_sets(T)
    rows = []
    qs = {}
    base_ms = {}
    for label, h, cache, cfg in VARIANTS:
        if heads is not None and h != heads:
            continue
        if h not in qs:
            qs = {h: torch.randn(T, h, 576, device="cuda", dtype=torch.bfloat16)}
        q = qs[h]
        for name, idx in sets.items():
            r = {"variant": label, "h": h, "cache": cache, "indices": name, "cfg": str(cfg)}
            try:
                o, l = run(cache, q[:32], kv, kv8, idx[:32], cfg)
                if cache == "bf16":
                    ro, rl = sparse_mla_prefill_reference(q[:32], kv, idx[:32], SCALE)
                else:
                    ro, rl = sparse_mla_prefill_reference(q[:32], kv8, idx[:32], SCALE, kv_format="fp8")
                r["rel_err"] = ((o.float() - ro.float()).norm() / ro.float().norm()).item()
                r["lse_err"] = (l - rl).abs().max().item()
                if not r["rel_err"] < 1e-2:
                    raise AssertionError(f"wrong result: rel err {r['rel_err']:.3g}")
                ms = bench_ms(lambda: run(cache, q, kv, kv8, idx, cfg))
                row_bytes = 1152 if cache in ("bf16", "fp8 dequant") else 656
                r.update(ms=ms, tflops=2 * T * K * h * 1088 / ms / 1e9, tbps=T * K * row_bytes / ms / 1e9)
                base_ms.setdefault((h, name), ms)                      # the first variant of each h is the baseline
                r["speedup_vs_base"] = base_ms[(h, name)] / ms
            except Exception as e:  # a variant that fails to compile or is wrong is reported, the others go on
                r["error"] = repr(e)[:300]
            rows.append(r)
            print(r, flush=True)
    payload = {"meta": run_metadata(), "ceilings": ceilings, "T": T, "context": CTX, "topk": K, "rows": rows,
               "index_sets": __doc__.split("Index sets: ")[1].split(" FLOP")[0]}
    print("ceilings:", {k: round(v, 3) for k, v in ceilings.items() if isinstance(v, float)})
    print(table(rows, ["variant", "h", "cache", "indices", "ms", "tflops", "tbps", "speedup_vs_base", "rel_err",
                       "error"]))
    print("written:", write_results("sparse_mla_prefill", payload))
    return 0


if __name__ == "__main__":
    args = sys.argv[1:]
    sys.exit(main(quick="--quick" in args, heads=int(args[args.index("--heads") + 1]) if "--heads" in args else None))
