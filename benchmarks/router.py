"""The MoE router on the GPU: torch's ``Router.torch_forward`` against the one-launch Triton router
(``kernels.router``, through ``route``), checked against each other, then timed: decode batches (1, 8 tokens)
replayed from a CUDA graph, prefill chunks (8192, 16384 tokens) with do_bench; plus a few block-size / D-split
variants of the kernel and its fp32-FMA products (``exact_products``) against the tensor-core products it uses for
bf16 x bf16.

    python -m benchmarks.router          # about 1 min on an H200; JSON to $OUT (or runs/benchmarks/)

Routers: glm-4.7-flash-dsa's (64 experts of D 2048, top-4, no groups) and deepseek-v3.2's (256 of D 7168, top-8,
8 groups keeping 4), random weights (bf16, as the model holds them; an fp32 weight row as well for glm), random
bf16 tokens. Checked: per token, the kernel's expert set equals torch's unless the two are within 1e-5 of a
selection boundary, of experts or of groups (``ids_equal``: the share of tokens with equal sets), the largest
difference of the selected choice values (``choice_err``, score + bias without the group mask) and of the weights
of experts both selected (``weight_err``).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import bench_ms, measure_ceilings, run_metadata, table, write_results  # noqa: E402
from benchmarks.decode_kernels import graph_us  # noqa: E402
from indexcache.kernels.router import route  # noqa: E402
from indexcache.kernels.router.triton import _programs_wanted, router_plan, router_triton  # noqa: E402
from indexcache.model.moe import Router  # noqa: E402
from indexcache.presets import preset_config  # noqa: E402

DECODE, PREFILL = (1, 8), (8192, 16384)


def build_router(model: str, weight_dtype: torch.dtype) -> Router:
    torch.manual_seed(0)
    router = Router(preset_config(model)).cuda()
    with torch.no_grad():
        router.weight.normal_(0, 0.02)
        router.e_score_correction_bias.normal_(0, 0.01)
    router.weight.data = router.weight.data.to(weight_dtype)
    return router


def check(router: Router, x: torch.Tensor) -> dict:
    """Kernel against ``Router.torch_forward`` on x (see the module text)."""
    cfg = router.cfg
    ids, wts = route(x, router)
    rid, rwt = router.torch_forward(x)
    scores = (x.float() @ router.weight.float().t()).sigmoid()
    raw = choice = scores + router.e_score_correction_bias.float()
    group_clear = torch.ones(choice.shape[0], dtype=torch.bool, device=choice.device)
    if cfg.n_group > 1:  # the reference's kept groups (its own choice), for the margins
        n, e = choice.shape
        gs = choice.view(n, cfg.n_group, -1).topk(2, dim=-1).values.sum(-1)
        gtop = gs.topk(cfg.topk_group + 1, dim=-1)
        group_clear = (gtop.values[:, -2] - gtop.values[:, -1]) > 1e-5
        keep = torch.zeros_like(gs, dtype=torch.bool).scatter_(1, gtop.indices[:, :-1], True)
        choice = choice.masked_fill(~keep.repeat_interleave(e // cfg.n_group, dim=1), float("-inf"))
    k = cfg.num_experts_per_tok
    top = choice.topk(k + 1, dim=-1).values
    clear = ((top[:, k - 1] - top[:, k]) > 1e-5) & group_clear  # a near-tie of two groups counts as unclear
    same = (ids.sort(1).values == rid.sort(1).values).all(1)
    both = same[:, None].expand_as(wts)
    return {
        "ids_equal": same.float().mean().item(),
        "ids_equal_clear": bool(same[clear].all()),
        "choice_err": (raw.gather(1, ids).sort(1).values - raw.gather(1, rid).sort(1).values).abs().max().item(),
        "weight_err": (wts.gather(1, ids.argsort(1))[both] - rwt.gather(1, rid.argsort(1))[both]).abs().max().item()
        if both.any() else 0.0,
    }


def time_us(fn, n: int) -> float:
    return graph_us(fn) if n in DECODE else bench_ms(fn) * 1e3


def variants(n: int, e: int, d: int, programs: int) -> list[dict]:
    """The plan's configuration and a few neighbours (block sizes, D splits, warps)."""
    plan = router_plan(n, e, d, programs)
    out = [dict(plan, num_warps=4, plan=True), dict(plan, num_warps=4, plan=False, exact_products=True)]
    if n in DECODE:
        for splits in (max(1, plan["splits"] // 2), plan["splits"] * 2):
            out.append(dict(plan, splits=splits, num_warps=4, plan=False))
        out.append(dict(plan, block_e=32, num_warps=4, plan=False))
    else:
        for bt, warps in ((32, 4), (128, 8), (64, 8)):
            out.append(dict(plan, block_t=bt, num_warps=warps, plan=False))
    seen, unique = set(), []
    for v in out:  # a neighbour may coincide with the plan (one split at most, say)
        key = tuple(v.get(k) for k in ("block_t", "block_e", "splits", "num_warps", "exact_products"))
        if key not in seen:
            seen.add(key)
            unique.append(v)
    return unique


def rows_for(model: str, weight_dtype: torch.dtype) -> list[dict]:
    router = build_router(model, weight_dtype)
    cfg = router.cfg
    e, d = cfg.n_routed_experts, cfg.hidden_size
    rows = []
    for n in DECODE + PREFILL:
        x = torch.randn(n, d, device="cuda", dtype=torch.bfloat16)
        base = {"model": model, "weight": str(weight_dtype).removeprefix("torch."), "n": n}
        chk = check(router, x)
        torch_us = time_us(lambda: router.torch_forward(x), n)
        kernel_us = time_us(lambda: route(x, router), n)
        rows.append(dict(base, case="torch_vs_kernel", torch_us=torch_us, kernel_us=kernel_us,
                         speedup=torch_us / kernel_us, **chk))
        for v in variants(n, e, d, _programs_wanted(x.device)):
            kw = {k: v[k] for k in ("block_t", "block_e", "block_d", "splits", "num_warps")}
            kw["exact_products"] = v.get("exact_products", False)

            def fn(kw=kw):
                return router_triton(x, router.weight, router.e_score_correction_bias, cfg.num_experts_per_tok,
                                     cfg.n_group, cfg.topk_group, cfg.norm_topk_prob, cfg.routed_scaling_factor, **kw)

            rows.append(dict(base, case="kernel_variant", us=time_us(fn, n), **v))
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--name", default="router")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("router needs a CUDA GPU", file=sys.stderr)
        return 2
    ceilings = measure_ceilings()
    rows = []
    for model, wd in (("glm-4.7-flash-dsa", torch.bfloat16), ("glm-4.7-flash-dsa", torch.float32),
                      ("deepseek-v3.2", torch.bfloat16)):
        rows += rows_for(model, wd)
    res = {"meta": run_metadata(), "ceilings": ceilings, "rows": rows,
           "timing": "n 1, 8: mean per call over 200 calls replayed from one CUDA graph; n 8192, 16384: do_bench "
                     "median"}
    for path in write_results(args.name, res, [args.out] if args.out else None):
        print("wrote", path)
    print(f"ceilings: copy {ceilings['copy_tbps']:.2f} TB/s, bf16 {ceilings['bf16_matmul_tflops']:.0f}, fp8 "
          f"{ceilings['fp8_matmul_tflops']:.0f} TFLOP/s")
    print(table([r for r in rows if r["case"] == "kernel_variant"],
                ["model", "weight", "n", "block_t", "block_e", "splits", "num_warps", "exact_products", "plan", "us"]))
    print(table([r for r in rows if r["case"] == "torch_vs_kernel"],
                ["model", "weight", "n", "torch_us", "kernel_us", "speedup", "ids_equal", "ids_equal_clear",
                 "choice_err", "weight_err"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
