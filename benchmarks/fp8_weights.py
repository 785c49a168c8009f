"""FP8 weights on one GPU (issue 10): numerics and speed of the FP8 paths against bf16, measured in one run.

    python -m benchmarks.fp8_weights            # ~3-4 minutes on an H200
    python -m benchmarks.fp8_weights --quick    # GEMMs and MoE only, ~1 minute
    python -m benchmarks.fp8_weights --small-m  # the small-M (decode) linear rows only, well under a minute

(a) linear layers: torch's block-scaled scaled_mm (1x128 activations, 128x128 weights) against the dequantise-
    then-matmul reference (relative error) and timed against bf16 F.linear, with and without the activation
    quantisation, at the models' shapes, plus the layers kept in bf16 (LM head, indexer) to show what FP8 would
    buy there; and at decode sizes (M = 1, 8, 16) the weight-only small-M kernel (what fp8_linear runs for
    M <= SMALL_M_MAX on CUDA) against bf16 F.linear and against act-quant + scaled_mm, with its fp8 weight
    bandwidth as a share of the same-run copy bandwidth;
(b) routed experts: the FP8 Experts path (decode kernel / grouped FP8 GEMM) against bf16 experts on the same
    dequantised weights, error and time, at decode and prefill token counts (prefill: both FP8 candidates); and
    the grouped GEMM alone: bf16 torch._grouped_mm against the FP8 W8A8 Triton kernel and against dequantising
    the FP8 weights to bf16 + torch._grouped_mm;
(c) which weights stay bf16: bytes of the kept-bf16 groups per preset, and the indexer's top-k overlap when its
    projections were FP8 (its selection is what every S layer reuses);
(d) whole models: glm-4.7-flash-dsa (all 47 layers) and deepseek-v3.2 dimensions (4 layers: 3 dense + 1 MoE),
    random weights quantised per 128x128 block; FP8 compute against the same weights dequantised to bf16: relative
    logit error over a 512-token prompt, and 64 greedy tokens from the engine (eager) for both: tokens equal
    before the first divergence, and teacher-forced argmax agreement on the FP8 run's continuation.
Writes fp8_weights.json (device, versions, date, same-run ceilings) under benchmarks/results and $OUT; prints a
short table last.
"""
from __future__ import annotations

import argparse
import copy
import time

import torch
import torch.nn.functional as F

from benchmarks.common import bench_ms, measure_ceilings, run_metadata, table, write_results
from indexcache.checkpoint import build_empty
from indexcache.kernels.fp8_linear import (SMALL_M_MAX, dequantize_weight, fp8_linear, fp8_linear_reference,
                                           fp8_linear_weight_only_reference, gpu_path_reason, quantize_act,
                                           quantize_weight, small_m_path, weight_only_mm, weight_scale_for_mm)
from indexcache.kernels.fp8_linear.ops import act_quant_mm
from indexcache.model.linear import use_dequantized_storage, use_fp8_storage
from indexcache.model.weight_sizes import weight_bytes_per_gpu
from indexcache.presets import preset_config

# (label, N, K): glm-4.7-flash-dsa (D=2048, 20 heads) and deepseek-v3.2 (D=7168, 128 heads) projections
LINEAR_SHAPES = [
    ("glm x_proj q_a+kv_a", 768 + 576, 2048), ("glm q_b", 20 * 256, 768), ("glm o_proj", 2048, 20 * 256),
    ("glm dense up", 10240, 2048), ("glm dense down", 2048, 10240), ("glm shared gate", 1536, 2048),
    ("glm lm_head (bf16 kept)", 154880, 2048), ("glm indexer wq_b (bf16 kept)", 32 * 128, 768),
    ("ds kv_a", 576, 7168), ("ds q_b", 128 * 192, 1536), ("ds o_proj", 7168, 128 * 128),
    ("ds shared gate", 2048, 7168),
]
TOKENS = [1, 32, 4096, 16384]
SMALL_M = [1, 8, 16]


def rel(a, b) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-30))


def linear_rows(tokens, reps_ms, small=None, copy_tbps=None) -> list[dict]:
    """Rows per (shape, M in tokens); ``small`` (a list) gets the small-M kernel's rows (M in SMALL_M)."""
    rows = []
    g = torch.Generator("cuda").manual_seed(0)
    for label, n, k in LINEAR_SHAPES:
        w = torch.randn(n, k, device="cuda", generator=g) / k ** 0.5
        wq, ws = quantize_weight(w)
        wd = dequantize_weight(wq, ws, torch.bfloat16)
        sb = weight_scale_for_mm(ws)
        del w
        for m in tokens:
            x = torch.randn(m, k, device="cuda", generator=g).to(torch.bfloat16)
            small_path = small_m_path(x, wq)
            r = {"shape": label, "M": m, "N": n, "K": k,
                 "gpu_path": "weight-only small-M" if small_path else gpu_path_reason(x, wq) or "scaled_mm"}
            y = fp8_linear(x, wq, ws)
            if m <= 4096:  # the fp32 references of the largest shapes take more memory than they tell
                refn = fp8_linear_weight_only_reference if small_path else fp8_linear_reference
                r["err_vs_reference"] = rel(y, refn(x, wq, ws, torch.float32))
                r["err_vs_bf16"] = rel(y, F.linear(x, wd))
            del y
            t_bf16 = bench_ms(lambda: F.linear(x, wd), *reps_ms)
            t_fp8 = bench_ms(lambda: fp8_linear(x, wq, ws, scale_for_mm=sb), *reps_ms)
            q, sa = quantize_act(x, pad_rows_to=4)
            t_q = bench_ms(lambda: quantize_act(x, pad_rows_to=4), *reps_ms)
            t_mm = bench_ms(lambda: F.scaled_mm(q, wq.t(), sa, F.ScalingType.BlockWise1x128, sb,
                                                F.ScalingType.BlockWise128x128, output_dtype=torch.bfloat16), *reps_ms)
            flops = 2 * m * n * k
            r.update(bf16_ms=t_bf16, fp8_ms=t_fp8, fp8_mm_only_ms=t_mm, act_quant_ms=t_q, fp8_over_mm=t_fp8 / t_mm,
                     act_quant_tbps=(3 * m * k + 4 * m * k // 128) / t_q / 1e9, speedup=t_bf16 / t_fp8,
                     speedup_mm_only=t_bf16 / t_mm, fp8_tflops=flops / t_fp8 / 1e9, bf16_tflops=flops / t_bf16 / 1e9,
                     fp8_weight_tbps=(n * k) / t_fp8 / 1e9, bf16_weight_tbps=(2 * n * k) / t_bf16 / 1e9)
            rows.append(r)
            print(f"{label:<30} M={m:<6} err/ref {r.get('err_vs_reference', float('nan')):.1e} err/bf16 "
                  f"{r.get('err_vs_bf16', float('nan')):.1e}  bf16 {t_bf16:.3f} ms  fp8 {t_fp8:.3f} ms "
                  f"(mm {t_mm:.3f}, quant {t_q:.3f})", flush=True)
        for m in SMALL_M if small is not None else []:
            small.append(small_m_row(label, m, wq, ws, wd, sb, g, reps_ms, copy_tbps))
        del wq, ws, wd
    torch.cuda.empty_cache()
    return rows


def small_m_row(label, m, wq, ws, wd, sb, g, reps_ms, copy_tbps) -> dict:
    """The weight-only kernel (the custom op fp8_linear calls for M <= SMALL_M_MAX) against bf16 F.linear and
    against act-quant + scaled_mm (the custom op, quantisation included) at one decode size."""
    n, k = wq.shape
    x = torch.randn(m, k, device="cuda", generator=g).to(torch.bfloat16)
    y = weight_only_mm(x, wq, ws)
    r = {"shape": label, "M": m, "N": n, "K": k,
         "err_vs_weight_only_reference": rel(y, fp8_linear_weight_only_reference(x, wq, ws, torch.float32)),
         "err_vs_bf16": rel(y, F.linear(x, wd))}
    t_bf = bench_ms(lambda: F.linear(x, wd), *reps_ms)
    t_w = bench_ms(lambda: weight_only_mm(x, wq, ws), *reps_ms)
    t_s = bench_ms(lambda: act_quant_mm(x, wq, sb), *reps_ms) if k % 128 == 0 and n % 16 == 0 else float("nan")
    tbps = (n * k + 2 * m * (n + k)) / t_w / 1e9
    r.update(bf16_ms=t_bf, small_m_ms=t_w, scaled_mm_path_ms=t_s, speedup_vs_bf16=t_bf / t_w,
             speedup_vs_scaled_mm=t_s / t_w, small_m_tbps=tbps, small_m_of_copy=tbps / copy_tbps if copy_tbps else None,
             bf16_weight_tbps=2 * n * k / t_bf / 1e9)
    print(f"  small-M {label:<28} M={m:<3} err/ref {r['err_vs_weight_only_reference']:.1e}  bf16 {t_bf:.4f} ms  "
          f"weight-only {t_w:.4f} ms  act-quant+scaled_mm {t_s:.4f} ms  ({tbps:.2f} TB/s)", flush=True)
    return r


def blockwise_ceiling(reps_ms) -> dict:
    n = 8192
    x = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    wq, ws = quantize_weight(torch.randn(n, n, device="cuda"))
    q, sa = quantize_act(x)
    sb = weight_scale_for_mm(ws)
    t = bench_ms(lambda: F.scaled_mm(q, wq.t(), sa, F.ScalingType.BlockWise1x128, sb,
                                     F.ScalingType.BlockWise128x128, output_dtype=torch.bfloat16), *reps_ms)
    t_q = bench_ms(lambda: quantize_act(x), *reps_ms)
    return {"blockwise_fp8_8192_tflops": 2 * n ** 3 / t / 1e9, "act_quant_8192x8192_ms": t_q,
            "act_quant_tbps": (n * n * 2 + n * n + n * n // 32) / t_q / 1e9}


def moe_rows(reps_ms) -> list[dict]:
    from indexcache.model.moe import Experts, quantize_experts

    rows = []
    for name, tokens in (("glm-4.7-flash-dsa", [1, 8, 4096, 16384]), ("deepseek-v3.2", [1, 8, 4096])):
        cfg = preset_config(name)
        E, inter, D = cfg.n_routed_experts, cfg.moe_intermediate_size, cfg.hidden_size
        g = torch.Generator("cuda").manual_seed(1)
        with torch.no_grad():
            gq, gs, dq, ds = quantize_experts(
                torch.randn(E, 2 * inter, D, device="cuda", generator=g, dtype=torch.bfloat16) * 0.02,
                torch.randn(E, D, inter, device="cuda", generator=g, dtype=torch.bfloat16) * 0.02)
        with torch.device("meta"):
            fp8, bf = Experts(cfg), Experts(cfg)
            fp8.use_fp8_storage(quantize=False)
        fp8, bf = fp8.to_empty(device="cuda"), bf.to_empty(device="cuda")
        for t, src in zip((fp8.gate_up, fp8.gate_up_scale_inv, fp8.down, fp8.down_scale_inv), (gq, gs, dq, ds)):
            t.copy_(src)
        del gq, gs, dq, ds
        gu, dn = fp8.dequantized(torch.bfloat16)  # bf16 experts with the very same (dequantised) weights
        bf.gate_up = torch.nn.Parameter(gu, requires_grad=False)
        bf.down = torch.nn.Parameter(dn, requires_grad=False)
        del gu, dn
        torch.cuda.empty_cache()
        K, E = cfg.num_experts_per_tok, cfg.n_routed_experts
        for t in tokens:
            x = torch.randn(t, cfg.hidden_size, device="cuda", generator=g).to(torch.bfloat16)
            ids = torch.stack([torch.randperm(E, device="cuda", generator=g)[:K] for _ in range(t)]) if t < 64 else \
                torch.randint(0, E, (t, K), device="cuda", generator=g)
            wts = torch.rand(t, K, device="cuda", generator=g)
            with torch.no_grad():
                y8, yb = fp8(x, ids, wts), bf(x, ids, wts)
                t8 = bench_ms(lambda: fp8(x, ids, wts), *reps_ms)
                tb = bench_ms(lambda: bf(x, ids, wts), *reps_ms)
            active = int(torch.unique(ids).numel())
            r = {"model": name, "tokens": t, "err_fp8_vs_bf16_same_weights": rel(y8, yb), "fp8_ms": t8, "bf16_ms": tb,
                 "speedup": tb / t8, "active_experts": active,
                 "fp8_weight_tbps": active * 3 * cfg.moe_intermediate_size * cfg.hidden_size / t8 / 1e9,
                 "path": "decode kernel" if t * K <= 64 else "grouped FP8 GEMM (Triton)"}
            rows.append(r)
            print(f"MoE {name:<18} T={t:<6} err {r['err_fp8_vs_bf16_same_weights']:.1e}  bf16 {tb:.3f} ms  "
                  f"fp8 {t8:.3f} ms ({r['path']})", flush=True)
        del fp8, bf
        torch.cuda.empty_cache()
    return rows


def grouped_rows(reps_ms) -> list[dict]:
    """The grouped expert GEMM alone (gate_up, glm and deepseek shapes): bf16 torch._grouped_mm on bf16 weights
    against the W8A8 Triton kernel (activation quantisation included), the model's FP8 prefill path. (Dequantising
    the FP8 weights to bf16 + torch._grouped_mm was slower at every size in run 21 and was deleted.)"""
    from indexcache.kernels.fp8_grouped_mm import fp8_grouped_mm, fp8_grouped_mm_reference
    from indexcache.kernels.fp8_grouped_mm import dequantize_expert
    from indexcache.model.moe import quantize_experts

    rows = []
    for name, tokens in (("glm-4.7-flash-dsa", [512, 4096, 16384]), ("deepseek-v3.2", [512, 4096])):
        cfg = preset_config(name)
        E, inter, D, K = cfg.n_routed_experts, cfg.moe_intermediate_size, cfg.hidden_size, cfg.num_experts_per_tok
        g = torch.Generator("cuda").manual_seed(3)
        w = torch.randn(E, 2 * inter, D, device="cuda", generator=g, dtype=torch.bfloat16) * 0.02
        w8, s8, _, _ = quantize_experts(w, torch.zeros(E, 128, 128, device="cuda"))
        del w
        # bf16 weights for the baseline (inter % 128 == 0 here: gate's and up's blocks stack evenly)
        wd = torch.stack([dequantize_expert(w8[e], s8[e]) for e in range(E)]).to(torch.bfloat16)
        for t in tokens:
            m = t * K
            ids = torch.randint(0, E, (m,), device="cuda", generator=g)
            counts = torch.bincount(ids, minlength=E).to(torch.int32)
            offs = counts.cumsum(0).to(torch.int32)
            a = torch.randn(m, D, device="cuda", generator=g).to(torch.bfloat16)
            t_bf = bench_ms(lambda: torch._grouped_mm(a, wd.transpose(1, 2), offs=offs), *reps_ms)

            def w8a8():
                a8, sa = quantize_act(a)
                return fp8_grouped_mm(a8, counts, w8, s8, sa, torch.bfloat16)

            t8 = bench_ms(w8a8, *reps_ms)
            flops = 2 * m * 2 * inter * D
            r = {"model": name, "tokens": t, "rows": m, "bf16_grouped_mm_ms": t_bf, "w8a8_ms": t8,
                 "speedup_w8a8": t_bf / t8, "w8a8_tflops": flops / t8 / 1e9, "bf16_tflops": flops / t_bf / 1e9}
            if m <= 16384:
                a8, sa = quantize_act(a)
                ref = fp8_grouped_mm_reference(a8, counts, w8, s8, sa, torch.float32)
                r["err_w8a8"] = rel(w8a8(), ref)
            rows.append(r)
            print(f"grouped {name:<18} T={t:<6} bf16 {t_bf:.3f} ms  W8A8 {t8:.3f} ms", flush=True)
        del w8, s8, wd
        torch.cuda.empty_cache()
    return rows


def kept_bf16_facts() -> dict:
    out = {}
    for name in ("glm-4.7-flash-dsa", "deepseek-v3.2", "glm-5"):
        c = preset_config(name)
        kv_b = 2 * c.num_layers * c.kv_lora_rank * c.num_heads * (c.qk_nope_head_dim + c.v_head_dim)
        idx = c.num_layers * c.indexer_params_per_layer * 2
        head = 2 * 2 * c.vocab_size * c.hidden_size
        total = weight_bytes_per_gpu(c, True)["total"]
        out[name] = {"fp8_model_bytes": total, "kv_b_share": kv_b / total, "indexer_share": idx / total,
                     "embed_and_head_share": head / total,
                     "saved_if_all_fp8_gib": (kv_b + idx + head) / 2 / 2**30}
    return out


@torch.no_grad()
def indexer_overlap(T=4096, topk=2048) -> dict:
    """Top-k overlap of glm's indexer selection (last 256 queries over T keys) with its wq_b and wk in FP8
    (128x128 weights, 1x128 activations) against bf16: what keeping the indexer in bf16 protects."""
    from indexcache.model.linear import Fp8Linear

    cfg = preset_config("glm-4.7-flash-dsa").replace(num_layers=1)
    model = build_empty(cfg, "cuda", torch.bfloat16).init_random(0).eval()
    ind = model.layers[0].self_attn.indexer
    ind8 = copy.deepcopy(ind)
    ind8.wq_b, ind8.wk = Fp8Linear.from_weight(ind.wq_b.weight.detach()), Fp8Linear.from_weight(ind.wk.weight.detach())
    g = torch.Generator("cuda").manual_seed(2)
    x = torch.randn(1, T, cfg.hidden_size, device="cuda", generator=g).to(torch.bfloat16)
    qr = torch.randn(1, T, cfg.q_lora_rank, device="cuda", generator=g).to(torch.bfloat16)
    cos, sin = model.rope(torch.arange(T, device="cuda")[None], torch.bfloat16)
    rows = slice(T - 256, T)
    q, k, w = ind.project(x, qr, cos, sin)
    q8, k8, w8 = ind8.project(x, qr, cos, sin)
    s, s8 = ind.scores(q[:, rows], k, w[:, rows]), ind8.scores(q8[:, rows], k8, w8[:, rows])
    a = torch.zeros_like(s, dtype=torch.bool).scatter_(-1, s.topk(topk, -1).indices, True)
    b = torch.zeros_like(s, dtype=torch.bool).scatter_(-1, s8.topk(topk, -1).indices, True)
    overlap = (a & b).sum(-1).float() / topk
    return {"keys": T, "topk": topk, "mean_overlap": float(overlap.mean()), "min_overlap": float(overlap.min()),
            "score_rel_err": rel(s8, s)}


def _route_hooks(model, forced=None):
    """Forward hooks on every MoE router: record the chosen experts (``forced`` None; returns the list they fill,
    in layer order), or replace them by ``forced``'s, with the weights recomputed from this model's own scores
    (numerics without selection flips)."""
    from indexcache.model.moe import Router

    routers = [m for m in model.modules() if isinstance(m, Router)]
    seen, handles = [], []
    for i, r in enumerate(routers):
        def hook(mod, args, out, i=i):
            if forced is None:
                seen.append(out[0])
                return None
            ids = forced[i]
            scores = F.linear(args[0].float(), mod.weight.float()).sigmoid()
            w = scores.gather(1, ids)
            if mod.cfg.norm_topk_prob:
                w = w / (w.sum(-1, keepdim=True) + 1e-20)
            return ids, w * mod.cfg.routed_scaling_factor
        handles.append(r.register_forward_hook(hook))
    return seen, handles


def whole_model(name, layers, prompt_len=512, gen=64) -> dict:
    from indexcache.engine import EngineConfig, LLMEngine
    from indexcache.sampling import SamplingParams

    cfg = preset_config(name)
    if layers:
        cfg = cfg.replace(num_layers=layers)
    t0 = time.perf_counter()
    fp8 = build_empty(cfg, "cuda", torch.bfloat16).init_random(0).eval()
    use_fp8_storage(fp8, quantize=True)
    bf = copy.deepcopy(fp8)
    use_dequantized_storage(bf, torch.bfloat16)
    torch.cuda.empty_cache()
    build_s = time.perf_counter() - t0
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (1, prompt_len), generator=g)
    with torch.no_grad():
        l8 = fp8(ids.to("cuda"), attn_impl="absorbed").logits[0].float()
        routes, hs = _route_hooks(bf)
        lb = bf(ids.to("cuda"), attn_impl="absorbed").logits[0].float()
        for h in hs:
            h.remove()
        # the FP8 model on the bf16 model's expert choices: numerics alone, no routing flips
        _, hs = _route_hooks(fp8, forced=routes)
        l8f = fp8(ids.to("cuda"), attn_impl="absorbed").logits[0].float()
        for h in hs:
            h.remove()
        # chaos control: the bf16 model itself, its embeddings perturbed by 1e-3 relative noise
        noise = bf.embed_tokens.register_forward_hook(
            lambda mod, a, o: o + 1e-3 * o.float().pow(2).mean().sqrt().to(o.dtype) * torch.randn(
                o.shape, device=o.device, generator=torch.Generator(o.device).manual_seed(5)).to(o.dtype))
        lbn = bf(ids.to("cuda"), attn_impl="absorbed").logits[0].float()
        noise.remove()
    out = {"model": name, "layers": cfg.num_layers, "build_s": build_s, "prompt": prompt_len,
           "logit_rel_err": rel(l8, lb), "last_logit_rel_err": rel(l8[-1], lb[-1]),
           "prompt_argmax_agreement": float((l8.argmax(-1) == lb.argmax(-1)).float().mean()),
           "logit_rel_err_routes_forced": rel(l8f, lb),
           "argmax_agreement_routes_forced": float((l8f.argmax(-1) == lb.argmax(-1)).float().mean()),
           "bf16_embed_noise_1e-3_logit_rel_err": rel(lbn, lb),
           "logit_spread_top1_minus_top2_over_std": float(((lb.topk(2, -1).values[:, 0] - lb.topk(2, -1).values[:, 1])
                                                           / lb.std(-1)).median())}
    toks = {}
    for label, m in (("fp8", fp8), ("bf16", bf)):
        eng = LLMEngine(m, EngineConfig(max_model_len=prompt_len + gen + 64, max_num_seqs=1, enforce_eager=True,
                                        num_kv_blocks=(prompt_len + gen + 64) // 64 + 4))
        s = eng.add_request(ids[0].tolist(), SamplingParams(max_tokens=gen, temperature=0, ignore_eos=True))
        while eng.has_unfinished():
            eng.step()
        toks[label] = list(s.output_ids)
        del eng
    same = next((i for i, (a, b) in enumerate(zip(toks["fp8"], toks["bf16"])) if a != b), gen)
    seq = torch.tensor([ids[0].tolist() + toks["fp8"]], device="cuda")
    with torch.no_grad():
        tb = bf(seq, attn_impl="absorbed").logits[0, prompt_len - 1:-1].argmax(-1)
    out.update(engine_tokens_equal_before_divergence=same, engine_tokens=gen,
               teacher_forced_agreement=float((tb.cpu() == torch.tensor(toks["fp8"])).float().mean()),
               weight_bytes_fp8=weight_bytes_per_gpu(cfg, True)["total"],
               weight_bytes_bf16=weight_bytes_per_gpu(cfg, False)["total"])
    print(f"{name} {cfg.num_layers} layers: routes forced: logit err {out['logit_rel_err_routes_forced']:.3e}, argmax "
          f"agree {out['argmax_agreement_routes_forced']:.3f}; bf16 with 1e-3 embedding noise: logit err "
          f"{out['bf16_embed_noise_1e-3_logit_rel_err']:.3e}; median top-1 gap / logit std "
          f"{out['logit_spread_top1_minus_top2_over_std']:.3f}", flush=True)
    print(f"{name} {cfg.num_layers} layers: logit err {out['logit_rel_err']:.3e}, argmax agree "
          f"{out['prompt_argmax_agreement']:.3f}, engine tokens equal for {same}/{gen}, teacher-forced "
          f"{out['teacher_forced_agreement']:.3f}", flush=True)
    del fp8, bf
    torch.cuda.empty_cache()
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="GEMMs (M=1, 4096) and MoE only")
    p.add_argument("--small-m", action="store_true",
                   help=f"only the decode-size linear rows (M = {SMALL_M}; weight-only kernel for M <= {SMALL_M_MAX})")
    p.add_argument("--name", default=None, help="results name (default fp8_weights, fp8_weights_small_m)")
    args = p.parse_args(argv)
    args.name = args.name or ("fp8_weights_small_m" if args.small_m else "fp8_weights")
    if not torch.cuda.is_available():
        print("needs a CUDA GPU")
        return 1
    meta = run_metadata()
    ceilings = measure_ceilings()
    reps = (10, 40)
    ceilings.update(blockwise_ceiling(reps))
    print(f"{meta['device']}  torch {meta['torch']}  ceilings {ceilings}", flush=True)
    payload = {"meta": meta, "ceilings": ceilings, "args": vars(args)}
    small = []
    payload["linear"] = linear_rows([] if args.small_m else [1, 4096] if args.quick else TOKENS, reps, small,
                                    ceilings["copy_tbps"])
    payload["small_m"] = small
    write_results(args.name, payload)
    small_cols = ["shape", "M", "err_vs_weight_only_reference", "bf16_ms", "small_m_ms", "scaled_mm_path_ms",
                  "speedup_vs_bf16", "speedup_vs_scaled_mm", "small_m_of_copy"]
    if args.small_m:
        for path in write_results(args.name, payload):
            print("wrote", path)
        print(table(small, small_cols))
        return 0
    payload["moe"] = moe_rows(reps)
    write_results(args.name, payload)
    payload["grouped"] = grouped_rows(reps)
    write_results(args.name, payload)
    payload["kept_bf16"] = kept_bf16_facts()
    if not args.quick:
        payload["indexer_fp8_overlap"] = indexer_overlap()
        write_results(args.name, payload)
        payload["whole_model"] = [whole_model("glm-4.7-flash-dsa", None), whole_model("deepseek-v3.2", 4)]
    for path in write_results(args.name, payload):
        print("wrote", path)
    print(table(payload["linear"], ["shape", "M", "gpu_path", "err_vs_reference", "err_vs_bf16", "bf16_ms", "fp8_ms",
                                    "fp8_mm_only_ms", "act_quant_ms", "fp8_over_mm", "speedup"]))
    print(table(small, small_cols))
    print(table(payload["moe"], ["model", "tokens", "path", "err_fp8_vs_bf16_same_weights", "bf16_ms", "fp8_ms",
                                 "speedup"]))
    print(table(payload["grouped"], ["model", "tokens", "bf16_grouped_mm_ms", "w8a8_ms", "speedup_w8a8"]))
    if "whole_model" in payload:
        print(table(payload["whole_model"], ["model", "layers", "logit_rel_err", "prompt_argmax_agreement",
                                             "logit_rel_err_routes_forced", "argmax_agreement_routes_forced",
                                             "bf16_embed_noise_1e-3_logit_rel_err",
                                             "engine_tokens_equal_before_divergence", "teacher_forced_agreement"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
