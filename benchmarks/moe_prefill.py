"""The MoE layer and the FP8 projections of one prefill chunk on the GPU: bf16 weights against FP8 weights, and
where the FP8 MoE's time goes.

    python -m benchmarks.moe_prefill                     # about 1-2 min on an H200; JSON to $OUT (or runs/benchmarks/)
    python -m benchmarks.moe_prefill --sweep             # + block/warp/stage sweeps of the two expert GEMMs

Shapes are a preset's (default glm-4.7-flash-dsa: D 2048, 64 experts of I 1536, top-4, one shared expert) with
random weights and the preset's router, at prefill chunk sizes (the engine's default chunk is 8192 tokens).
Rows:
- ``moe``: the whole MoE forward (router, routed and shared experts) with bf16 weights and with FP8 weights;
- ``moe_fp8_stages``: the FP8 forward's steps timed one by one on the same inputs (router, routing plan,
  activation quantisation, the fused gate/up + SwiGLU grouped GEMM, the weighted down grouped GEMM, the pair sum,
  the shared expert), with TFLOP/s for the GEMMs; and the torch ops the plan replaced (``torch_order_tiles``);
- ``moe_fp8_unfused``: the same experts composed the way they ran before the fusion (torch sort and tile maps,
  gather x by pair, quantise, gate/up GEMM to bf16, SwiGLU in torch, quantise, down GEMM, ``combine_experts``);
- ``proj``: the attention input/output projections of one layer (fused q_a+kv_a, q_b, o_proj) bf16 vs FP8
  (cuBLAS's block-scaled GEMM, as the model runs them), and the same through the grouped kernel as one expert;
- ``sweep`` (``--sweep``): configurations of the two expert GEMMs.
The last table compares "MoE + projections" per layer and chunk, bf16 against FP8 (the FP8-weights issue's
prefill target is a ratio of at least 1.6).
"""
from __future__ import annotations

import argparse
import copy
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import bench_ms, measure_ceilings, run_metadata, table, write_results  # noqa: E402
from indexcache.kernels.expert_plan import expert_plan, tile_map_reference  # noqa: E402
from indexcache.kernels.fp8_grouped_mm import fp8_grouped_mm, fp8_grouped_swiglu, plan_block_sizes  # noqa: E402
from indexcache.kernels.fp8_grouped_mm.triton import (config_for, fp8_grouped_mm_triton,  # noqa: E402
                                                      fp8_grouped_swiglu_triton, swiglu_config_for)
from indexcache.kernels.fp8_linear import quantize_act  # noqa: E402
from indexcache.model.linear import Fp8Linear, fuse_fp8_linears  # noqa: E402
from indexcache.model.moe import MoE, combine_experts, expert_order  # noqa: E402
from indexcache.presets import preset_config  # noqa: E402


def build_moe(cfg, seed: int) -> MoE:
    torch.manual_seed(seed)
    moe = MoE(cfg).cuda()
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0, 0.02)
        moe.gate.e_score_correction_bias.normal_(0, 0.01)
    return moe.to(torch.bfloat16)


def to_fp8(moe: MoE) -> MoE:
    m = copy.deepcopy(moe)
    for n in ("gate_proj", "up_proj", "down_proj"):
        setattr(m.shared_experts, n, Fp8Linear.from_weight(getattr(m.shared_experts, n).weight.detach()))
    m.experts.use_fp8_storage(quantize=True)
    return m


def routed_flops(n_pairs: int, d: int, inter: int) -> tuple[float, float]:
    return 2.0 * n_pairs * d * 2 * inter, 2.0 * n_pairs * inter * d


def stages(moe8: MoE, x: torch.Tensor, tokens: int, bf16_experts=None) -> list[dict]:
    """The FP8 forward's steps one by one (as ``fp8_experts_w8a8`` runs them) and the unfused composition."""
    ex = moe8.experts
    ids, weights = moe8.gate(x)
    N, K = ids.shape
    E, D, inter = ex.gate_up.shape[0], x.shape[1], ex.inter
    flat = ids.flatten()
    plan = expert_plan(ids, weights, E, plan_block_sizes(N * K, E))
    x8, sx = quantize_act(x)
    h8, sh = fp8_grouped_swiglu(x8, plan.counts, ex.gate_up, ex.gate_up_scale_inv, sx, inter, a_rows=plan.token,
                                plan=plan)
    pairs = fp8_grouped_mm(h8, plan.counts, ex.down, ex.down_scale_inv, sh, x.dtype, out_rows=plan.pair,
                           row_weight=plan.weight, plan=plan)
    f1, f2 = routed_flops(N * K, D, inter)
    rows = []

    def row(name, fn, flops=None):
        ms = bench_ms(fn)
        r = {"case": "moe_fp8_stages", "tokens": tokens, "stage": name, "ms": ms}
        if flops:
            r["tflops"] = flops / ms / 1e9
        rows.append(r)

    def torch_order_tiles():  # what the plan replaced: a sort, counts and one tile map per GEMM in torch ops
        o = expert_order(flat, E)
        c = torch.zeros(E, dtype=torch.int32, device=x.device).scatter_add_(
            0, flat, torch.ones_like(flat, dtype=torch.int32))
        return o, [tile_map_reference(c, N * K, b) for b in plan_block_sizes(N * K, E)]

    row("router", lambda: moe8.gate(x))
    row("plan", lambda: expert_plan(ids, weights, E, plan_block_sizes(N * K, E)))
    row("torch_order_tiles", torch_order_tiles)
    row("quant_x", lambda: quantize_act(x))
    row("gate_up_swiglu", lambda: fp8_grouped_swiglu(x8, plan.counts, ex.gate_up, ex.gate_up_scale_inv, sx, inter,
                                                     a_rows=plan.token, plan=plan), f1)
    for gemm in ("triton", "gluon"):  # production: gluon on Hopper (model/moe.py)
        row(f"down_weighted_{gemm}", lambda gemm=gemm: fp8_grouped_mm(
            h8, plan.counts, ex.down, ex.down_scale_inv, sh, x.dtype, out_rows=plan.pair, row_weight=plan.weight,
            plan=plan, gemm=gemm), f2)
    row("pair_sum", lambda: pairs.view(N, K, -1).sum(1))
    row("shared", lambda: moe8.shared_experts(x), 2.0 * N * D * 3 * moe8.shared_experts.gate_proj.out_features)
    order = expert_order(flat, E)
    counts = plan.counts

    def unfused():
        xs = x[order // K]
        a8, sa = quantize_act(xs)
        h = fp8_grouped_mm(a8, counts, ex.gate_up, ex.gate_up_scale_inv, sa, x.dtype)
        g, u = h.split(inter, dim=-1)
        b8, sb = quantize_act(F.silu(g) * u)
        ys = fp8_grouped_mm(b8, counts, ex.down, ex.down_scale_inv, sb, x.dtype)
        return combine_experts(ys, order, weights)

    ms = bench_ms(unfused)
    rows.append({"case": "moe_fp8_unfused", "tokens": tokens, "stage": "routed experts, unfused", "ms": ms})
    ms = bench_ms(lambda: ex(x, ids, weights))
    rows.append({"case": "moe_fp8_fused", "tokens": tokens, "stage": "routed experts, fused", "ms": ms})
    # bf16 routed experts' grouped GEMMs alone, for the GEMM ratio
    if bf16_experts is not None:
        xs = x[order // K]
        offs = counts.cumsum(0).to(torch.int32)
        gu, dn = bf16_experts.gate_up, bf16_experts.down
        h = torch._grouped_mm(xs, gu.transpose(1, 2), offs=offs)
        a = F.silu(h[:, :inter]) * h[:, inter:]
        for name, fn, fl in (("bf16 gate_up", lambda: torch._grouped_mm(xs, gu.transpose(1, 2), offs=offs), f1),
                             ("bf16 down", lambda: torch._grouped_mm(a, dn.transpose(1, 2), offs=offs), f2)):
            ms = bench_ms(fn)
            rows.append({"case": "moe_bf16_gemm", "tokens": tokens, "stage": name, "ms": ms, "tflops": fl / ms / 1e9})
    return rows


def sweep(moe8: MoE, x: torch.Tensor, tokens: int) -> list[dict]:
    ex = moe8.experts
    ids, weights = moe8.gate(x)
    N, K = ids.shape
    E, D, inter = ex.gate_up.shape[0], x.shape[1], ex.inter
    plans = {b: expert_plan(ids, weights, E, (b,)) for b in (64, 128)}
    plan = plans[128]
    x8, sx = quantize_act(x)
    h8, sh = fp8_grouped_swiglu(x8, plan.counts, ex.gate_up, ex.gate_up_scale_inv, sx, inter, a_rows=plan.token,
                                plan=plan)
    f1, f2 = routed_flops(N * K, D, inter)
    rows = []
    default1, default2 = swiglu_config_for(N * K, E), config_for(N * K, E)
    for bm, warps, st in ((64, 8, 3), (64, 8, 4), (128, 8, 2), (128, 8, 3), (128, 8, 4)):
        cfg = {"block_m": bm, "num_warps": warps, "num_stages": st}
        try:
            ms = bench_ms(lambda: fp8_grouped_swiglu_triton(x8, plan.counts, ex.gate_up, ex.gate_up_scale_inv, sx,
                                                            inter, a_rows=plan.token, config=cfg, plan=plans[bm]))
        except Exception as e:  # noqa: BLE001 - a config that does not fit is a row, not a crash
            rows.append({"case": "sweep_gate_up", "tokens": tokens, "config": str(cfg), "error": type(e).__name__})
            continue
        rows.append({"case": "sweep_gate_up", "tokens": tokens, "config": str(cfg), "ms": ms,
                     "tflops": f1 / ms / 1e9, "default": cfg == default1})
    for bm, bn, warps, st in ((64, 128, 4, 3), (64, 128, 4, 4), (64, 128, 4, 5), (64, 64, 4, 4), (128, 128, 8, 4),
                              (128, 64, 4, 4)):
        cfg = {"block_m": bm, "block_n": bn, "num_warps": warps, "num_stages": st}
        try:
            ms = bench_ms(lambda: fp8_grouped_mm_triton(h8, plan.counts, ex.down, ex.down_scale_inv, sh,
                                                        out_dtype=x.dtype, config=cfg, out_rows=plan.pair,
                                                        row_weight=plan.weight, plan=plans[bm]))
        except Exception as e:  # noqa: BLE001
            rows.append({"case": "sweep_down", "tokens": tokens, "config": str(cfg), "error": type(e).__name__})
            continue
        rows.append({"case": "sweep_down", "tokens": tokens, "config": str(cfg), "ms": ms, "tflops": f2 / ms / 1e9,
                     "default": cfg == default2})
    return rows


def projections(cfg, tokens: int, seed: int) -> list[dict]:
    """One attention layer's FP8-able projections: q_a and kv_a fused (as the engine runs them), q_b, o_proj."""
    g = torch.Generator("cuda").manual_seed(seed)
    D, H = cfg.hidden_size, cfg.num_heads
    shapes = {"q_a+kv_a": (cfg.q_lora_rank + cfg.kv_lora_rank + cfg.qk_rope_head_dim, D),
              "q_b": (H * (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim), cfg.q_lora_rank),
              "o_proj": (D, H * cfg.v_head_dim)}
    rows = []
    for name, (n, k) in shapes.items():
        w = torch.randn(n, k, generator=g, device="cuda") * 0.02
        x = torch.randn(tokens, k, generator=g, device="cuda").to(torch.bfloat16)
        lin8 = Fp8Linear.from_weight(w) if name != "q_a+kv_a" else fuse_fp8_linears(
            [Fp8Linear.from_weight(w[:cfg.q_lora_rank]), Fp8Linear.from_weight(w[cfg.q_lora_rank:])])
        wb = w.to(torch.bfloat16)
        ms_b = bench_ms(lambda: F.linear(x, wb))
        ms_8 = bench_ms(lambda: lin8(x))
        # the same projection through our grouped kernel as one expert (quantisation pass included): is it
        # faster than cuBLAS's block-scaled GEMM at these small N? (measured only; the model uses scaled_mm)
        lin = Fp8Linear.from_weight(w)
        w8, s8 = lin.weight, lin.weight_scale_inv
        one = torch.tensor([tokens], dtype=torch.int32, device="cuda")
        plan = expert_plan(torch.zeros(tokens, 1, dtype=torch.long, device="cuda"), torch.ones(tokens, 1, device="cuda"),
                           1, (64,))

        def triton_proj():
            q, sq = quantize_act(x)
            return fp8_grouped_mm_triton(q, one, w8[None], s8[None], sq, out_dtype=torch.bfloat16, plan=plan)

        ref = F.linear(x.float(), lin.dequantized(torch.float32))
        err = float((triton_proj().float() - ref).norm() / ref.norm())
        ms_t = bench_ms(triton_proj)
        rows.append({"case": "proj", "tokens": tokens, "stage": name, "bf16_ms": ms_b, "fp8_ms": ms_8,
                     "ratio": ms_b / ms_8, "fp8_tflops": 2.0 * tokens * n * k / ms_8 / 1e9,
                     "fp8_triton_ms": ms_t, "fp8_triton_rel_err": err})
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="glm-4.7-flash-dsa")
    ap.add_argument("--tokens", default="8192,16384", help="chunk sizes, comma-separated")
    ap.add_argument("--sweep", action="store_true", help="also sweep the expert GEMMs' block sizes")
    ap.add_argument("--name", default="moe_prefill")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("moe_prefill: needs a CUDA GPU")
        return 2
    ceilings = measure_ceilings()
    cfg = preset_config(args.model)
    moe_b = build_moe(cfg, seed=0)
    moe_8 = to_fp8(moe_b)
    rows, summary = [], []
    with torch.no_grad():
        for tokens in (int(t) for t in args.tokens.split(",")):
            x = torch.randn(tokens, cfg.hidden_size, device="cuda").to(torch.bfloat16)
            ms_b, ms_8 = bench_ms(lambda: moe_b(x)), bench_ms(lambda: moe_8(x))
            rows.append({"case": "moe", "tokens": tokens, "bf16_ms": ms_b, "fp8_ms": ms_8, "ratio": ms_b / ms_8})
            out_b, out_8 = moe_b(x).float(), moe_8(x).float()
            rows[-1]["fp8_vs_bf16_rel_err"] = float((out_8 - out_b).norm() / out_b.norm())
            rows += stages(moe_8, x, tokens, moe_b.experts)
            proj = projections(cfg, tokens, seed=tokens)
            rows += proj
            if args.sweep:
                rows += sweep(moe_8, x, tokens)
            pb, p8 = sum(r["bf16_ms"] for r in proj), sum(r["fp8_ms"] for r in proj)
            summary.append({"tokens": tokens, "moe_bf16_ms": ms_b, "moe_fp8_ms": ms_8, "proj_bf16_ms": pb,
                            "proj_fp8_ms": p8, "moe+proj ratio": (ms_b + pb) / (ms_8 + p8)})
            for r in rows:
                if r.get("tokens") == tokens:
                    print(r, flush=True)
    write_results(args.name, {"meta": run_metadata(), "ceilings": ceilings, "model": args.model, "rows": rows,
                              "summary": summary})
    print(f"ceilings: bf16 {ceilings['bf16_matmul_tflops']:.0f} TFLOP/s, fp8 {ceilings['fp8_matmul_tflops']:.0f}, "
          f"copy {ceilings['copy_tbps']:.2f} TB/s")
    stage_rows = [r for r in rows if r["case"].startswith("moe_") or r["case"].startswith("sweep")]
    print(table(stage_rows, ["case", "tokens", "stage", "config", "ms", "tflops"]))
    print(table([r for r in rows if r["case"] == "proj"], ["tokens", "stage", "bf16_ms", "fp8_ms", "ratio",
                                                           "fp8_triton_ms"]))
    print(table(summary, list(summary[0])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
