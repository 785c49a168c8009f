"""Where FP8 error comes from in a deep random-weight model, and what it costs a trained one (issue 10). CPU or GPU.

    python -m benchmarks.fp8_error_growth              # ~10 minutes on 1-2 CPU cores (fp32), ~1 minute on a GPU
    python -m benchmarks.fp8_error_growth --layers 6   # more MoE layers (CPU: ~2.4 GB of fp32 experts per layer)

(a) glm-4.7-flash-dsa dimensions (D=2048, 64 experts, top-4; the vocabulary cut to 32768 to save memory), a few
    layers, random weights, fp32: per layer output, the relative error of
      - weights quantised per 128x128 block (then dequantised; activations exact) against the original weights,
      - FP8 compute (weights + 1x128 activations) against the same dequantised weights,
    each with free expert routing and with the routes forced to the reference run's (``_route_hooks``), plus the
    share of tokens whose expert set differs; and a control: the original model with a 1e-3 relative
    perturbation of its embeddings. Error that stays flat under forced routes but grows under free routes comes
    from routing flips on the random router's close scores, not from FP8 numerics.
(b) the trained fixture tests/fixtures/stdlib-dsa-tiny: held-out loss (nats per byte, bits per byte) in fp32, bf16,
    FP8 weights only, and FP8 weights + activations.
Prints the tables and writes fp8_error_growth.json (benchmarks/results and $OUT).
"""
from __future__ import annotations

import argparse
import copy
import os
import time

import torch

from benchmarks.common import run_metadata, table, write_results
from benchmarks.fp8_weights import _route_hooks, rel
from indexcache.checkpoint import build_empty, load_model
from indexcache.model.linear import use_dequantized_storage, use_fp8_storage
from indexcache.presets import preset_config

FIXTURE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "fixtures",
                       "stdlib-dsa-tiny")


@torch.no_grad()
def _run(model, ids, forced=None, noise=0.0):
    """Each layer's output, the routes (when not forced) and the logits."""
    outs = []
    hooks = [layer.register_forward_hook(lambda m, a, o: outs.append(o[0].float().clone())) for layer in model.layers]
    if noise:
        hooks.append(model.embed_tokens.register_forward_hook(
            lambda m, a, o: o + noise * o.pow(2).mean().sqrt() * torch.randn(
                o.shape, device=o.device, generator=torch.Generator(o.device).manual_seed(5)).to(o.dtype)))
    routes, rh = _route_hooks(model, forced)
    logits = model(ids, attn_impl="absorbed").logits[0].float()
    for h in hooks + rh:
        h.remove()
    return outs, routes, logits


def _flips(a, b) -> list[float]:
    return [float((a[i].sort(-1).values != b[i].sort(-1).values).any(-1).float().mean()) for i in range(len(a))]


def error_growth(layers: int, device: str, tokens: int = 64) -> tuple[list[dict], dict]:
    cfg = preset_config("glm-4.7-flash-dsa").replace(num_layers=layers, vocab_size=32768)
    model = build_empty(cfg, device, torch.float32).init_random(0).eval()
    ids = torch.randint(0, cfg.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(0)).to(device)
    hW, rW, lW = _run(model, ids)
    hN, rN, lN = _run(model, ids, noise=1e-3)
    hNf, _, lNf = _run(model, ids, forced=rW, noise=1e-3)
    use_fp8_storage(model, quantize=True)
    deq = copy.deepcopy(model)
    use_dequantized_storage(deq, torch.float32)
    hD, rD, lD = _run(deq, ids)
    hDf, _, lDf = _run(deq, ids, forced=rW)
    del deq
    hQ, rQ, lQ = _run(model, ids)
    hQf, _, lQf = _run(model, ids, forced=rD)
    moe = [i for i in range(layers) if cfg.mlp_layer_types[i] != "dense"]
    fD, fQ, fN = _flips(rD, rW), _flips(rQ, rD), _flips(rN, rW)
    rows = []
    for i in range(layers + 1):
        def pick(h, lg, i=i):
            return lg if i == layers else h[i]

        j = moe.index(i) if i in moe else None
        rows.append({"layer": "logits" if i == layers else i,
                     "mlp": "" if i == layers else cfg.mlp_layer_types[i],
                     "wq_vs_orig": rel(pick(hD, lD), pick(hW, lW)),
                     "wq_vs_orig_forced": rel(pick(hDf, lDf), pick(hW, lW)),
                     "wq_flips": fD[j] if j is not None else None,
                     "fp8_vs_deq": rel(pick(hQ, lQ), pick(hD, lD)),
                     "fp8_vs_deq_forced": rel(pick(hQf, lQf), pick(hD, lD)),
                     "fp8_flips": fQ[j] if j is not None else None,
                     "noise_1e-3": rel(pick(hN, lN), pick(hW, lW)),
                     "noise_1e-3_forced": rel(pick(hNf, lNf), pick(hW, lW)),
                     "noise_flips": fN[j] if j is not None else None})
    summary = {"argmax_agreement_fp8_vs_deq": float((lQ.argmax(-1) == lD.argmax(-1)).float().mean()),
               "argmax_agreement_fp8_vs_deq_forced": float((lQf.argmax(-1) == lD.argmax(-1)).float().mean()),
               "residual_rms": [float(h.pow(2).mean().sqrt()) for h in hW], "tokens": tokens, "layers": layers}
    return rows, summary


@torch.no_grad()
def fixture_quality(device: str, windows: int = 48) -> list[dict]:
    from indexcache.tools.corpus import load_corpus
    from indexcache.tools.evaluate import heldout_loss

    test = load_corpus("test")
    rows = []
    for label, dtype, wd, dequant in (("fp32", torch.float32, "bf16", False), ("bf16", torch.bfloat16, "bf16", False),
                                      ("fp8 weights only (dequantised to fp32)", torch.float32, "fp8", True),
                                      ("fp8 weights + 1x128 fp8 activations", torch.float32, "fp8", False)):
        m = load_model(FIXTURE, device=device, dtype=dtype, weight_dtype=wd).eval()
        if dequant:
            use_dequantized_storage(m, torch.float32)
        r = heldout_loss(m, test, context=512, max_windows=windows, batch=4, device=device)
        rows.append({"model": label, "loss_nats_per_byte": r["loss"], "bits_per_byte": r["bits_per_byte"],
                     "tokens": r["tokens"]})
        print(f"fixture {label:<42} loss {r['loss']:.4f}  bpb {r['bits_per_byte']:.4f}", flush=True)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=4, help="glm layers (the first is dense, the rest MoE)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--name", default="fp8_error_growth", help="result file name (benchmarks/results/NAME.json)")
    args = p.parse_args(argv)
    if args.device == "cpu":
        torch.set_num_threads(min(2, os.cpu_count() or 1))
    t0 = time.perf_counter()
    payload = {"meta": run_metadata(), "args": vars(args)}
    payload["fixture"] = fixture_quality(args.device)
    rows, summary = error_growth(args.layers, args.device)
    payload.update(error_growth=rows, error_growth_summary=summary, seconds=time.perf_counter() - t0)
    for path in write_results(args.name, payload):
        print("wrote", path)
    print(table(payload["fixture"], ["model", "loss_nats_per_byte", "bits_per_byte", "tokens"]))
    print(table(rows, ["layer", "mlp", "wq_vs_orig", "wq_vs_orig_forced", "wq_flips", "fp8_vs_deq", "fp8_vs_deq_forced",
                       "fp8_flips", "noise_1e-3", "noise_1e-3_forced", "noise_flips"]))
    print({k: v for k, v in summary.items()})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
