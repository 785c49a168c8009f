"""Decode-sized FP8 kernels on the GPU: the weight-only small-M linear at the model's projection shapes, and the
small-batch routed-expert kernels over a sweep of block sizes and warps. Each case is checked against its
PyTorch reference, then timed replayed from a CUDA graph (launch overhead out, as in decode).

    python -m benchmarks.decode_kernels                   # about 1 min on an H200; JSON to $OUT (or runs/benchmarks/)

Printed: µs per call and the weight bytes read per µs (TB/s), beside the same run's copy bandwidth.
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys

import torch
import triton

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import measure_ceilings, run_metadata, table, write_results  # noqa: E402
from indexcache.checkpoint import build_empty  # noqa: E402
from indexcache.kernels.fp8_linear import (fp8_gemv_triton, fp8_linear_weight_only_reference,  # noqa: E402
                                           quantize_weight)
from indexcache.kernels.moe import moe_experts_small_reference  # noqa: E402
from indexcache.kernels.moe.triton import moe_experts_small_triton  # noqa: E402
from indexcache.model.linear import fp8_linear_slots  # noqa: E402
from indexcache.presets import preset_config  # noqa: E402


def graph_us(fn, reps: int = 200) -> float:
    """Mean µs per call over ``reps`` calls captured in one CUDA graph (the kernels back to back, as in decode)."""
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps):
            fn()
    g.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(3):
        g.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / (3 * reps)


def projection_shapes(model_name: str) -> list[tuple[str, int, int]]:
    """(name, N, K) of every FP8 linear in one layer of the preset (deduplicated)."""
    cfg = preset_config(model_name).replace(num_layers=2)
    model = build_empty(cfg, "meta", torch.bfloat16)
    seen, out = set(), []
    for parent, name in fp8_linear_slots(model):
        n, k = getattr(parent, name).weight.shape
        if (n, k) not in seen:
            seen.add((n, k))
            out.append((name, n, k))
    return out


def gemv_rows(model_name: str, ms: list[int]) -> list[dict]:
    rows = []
    for (name, n, k), m in itertools.product(projection_shapes(model_name), ms):
        g = torch.Generator("cuda").manual_seed(n + k)
        wq, ws = quantize_weight(torch.randn(n, k, generator=g, device="cuda") / k ** 0.5)
        x = torch.randn(m, k, generator=g, device="cuda").to(torch.bfloat16)
        want = fp8_linear_weight_only_reference(x, wq, ws, out_dtype=torch.float32)
        err = float((fp8_gemv_triton(x, wq, ws).float() - want).abs().max() / want.abs().amax())
        us = graph_us(lambda: fp8_gemv_triton(x, wq, ws))
        rows.append({"kernel": "fp8_gemv", "case": f"{name} {n}x{k}", "m": m, "us": us,
                     "tb_s": (n * k + ws.numel() * 4) / us / 1e6, "rel_err": err})
    return rows


def moe_rows(e: int, d: int, inter: int, k: int, batches: list[int], sweep: dict) -> list[dict]:
    g = torch.Generator("cuda").manual_seed(0)
    def experts(rows, cols):  # per expert, per 128x128 block
        qs = [quantize_weight(torch.randn(rows, cols, generator=g, device="cuda") / cols ** 0.5) for _ in range(e)]
        return torch.stack([q for q, _ in qs]), torch.stack([s for _, s in qs])

    gq, gs = experts(2 * inter, d)
    dq, ds = experts(d, inter)
    rows = []
    for n in batches:
        x = torch.randn(n, d, generator=g, device="cuda").to(torch.bfloat16)
        ids = torch.stack([torch.randperm(e, generator=g, device="cuda")[:k] for _ in range(n)]).to(torch.int32)
        w = torch.rand(n, k, generator=g, device="cuda") + 0.1
        want = moe_experts_small_reference(x.float(), ids, w, gq, dq, gs, ds)
        distinct = int(ids.unique().numel())
        nbytes = distinct * (3 * inter * d + (gs[0].numel() + ds[0].numel()) * 4)
        for cfg in (dict(zip(sweep, v)) for v in itertools.product(*sweep.values())):
            def fn(cfg=cfg):
                return moe_experts_small_triton(x, ids, w, gq, dq, gate_up_scale=gs, down_scale=ds, **cfg)
            try:
                err = float((fn().float() - want).abs().max() / want.abs().amax())
                us = graph_us(fn)
            except Exception as exc:  # a config that does not compile (registers, shared memory) is reported
                rows.append({"kernel": "moe_small_fp8", "case": f"N{n} K{k}", "m": n, **cfg, "error": str(exc)[:80]})
                continue
            rows.append({"kernel": "moe_small_fp8", "case": f"N{n} K{k} E{e} D{d} I{inter}", "m": n, **cfg,
                         "us": us, "tb_s": nbytes / us / 1e6, "rel_err": err})
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="glm-4.7-flash-dsa")
    p.add_argument("--name", default="decode_kernels")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("decode_kernels needs a CUDA GPU", file=sys.stderr)
        return 2
    ceilings = measure_ceilings()
    cfg = preset_config(args.model)
    rows = gemv_rows(args.model, [1, 8])
    sweep = {"block_i": [16, 32], "block_d": [256, 512], "gate_up_warps": [4, 8],
             "block_d2": [16, 32], "block_i2": [512, 1024], "down_warps": [4, 8]}
    rows += moe_rows(cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts_per_tok,
                     [1, 8], sweep)
    res = {"meta": run_metadata(), "ceilings": ceilings, "rows": rows}
    for path in write_results(args.name, res, [args.out] if args.out else None):
        print("wrote", path)
    print(f"ceilings: copy {ceilings['copy_tbps']:.2f} TB/s, bf16 {ceilings['bf16_matmul_tflops']:.0f}, fp8 "
          f"{ceilings['fp8_matmul_tflops']:.0f} TFLOP/s")
    print(table([r for r in rows if r["kernel"] == "fp8_gemv"], ["case", "m", "us", "tb_s", "rel_err"]))
    moe = sorted((r for r in rows if r["kernel"] != "fp8_gemv" and "us" in r), key=lambda r: (r["m"], r["us"]))
    for m in sorted({r["m"] for r in moe}):
        best = [r for r in moe if r["m"] == m]
        default = [r for r in best if (r["block_i"], r["block_d"], r["gate_up_warps"], r["block_d2"], r["block_i2"],
                                       r["down_warps"]) == (16, 256, 4, 16, 512, 4)]
        print(table(best[:6] + default, list(sweep) + ["us", "tb_s", "rel_err"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
