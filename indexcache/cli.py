"""The ``indexcache`` command line."""
from __future__ import annotations

import argparse
import json
import os
import sys


def _cmd_demo(args) -> int:
    from .demo import run_demo

    res = run_demo(args.model, seq_len=args.seq_len, seed=args.seed, patterns=tuple(args.patterns))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0


def _cmd_info(args) -> int:
    from .config import ModelConfig
    from .presets import preset_config, preset_names

    cfg = ModelConfig.from_checkpoint(args.model) if os.path.isdir(args.model) else None
    if cfg is None:
        if args.model not in preset_names():
            print(f"error: {args.model!r} is neither a checkpoint folder nor a preset ({', '.join(preset_names())})",
                  file=sys.stderr)
            return 2
        cfg = preset_config(args.model)
    if args.pattern:
        cfg = cfg.with_pattern(args.pattern)
    print(f"{cfg.family}: {cfg.num_layers} layers, hidden {cfg.hidden_size}, {cfg.num_heads} heads, "
          f"q_lora {cfg.q_lora_rank}, kv_lora {cfg.kv_lora_rank}, nope/rope/v {cfg.qk_nope_head_dim}/"
          f"{cfg.qk_rope_head_dim}/{cfg.v_head_dim}")
    print(f"indexer {cfg.index_n_heads}x{cfg.index_head_dim}, top-k {cfg.index_topk}; rope layout MLA "
          f"{'interleaved' if cfg.mla_rope_interleaved else 'half-split'}, indexer "
          f"{'interleaved' if cfg.indexer_rope_interleaved else 'half-split'}; softmax scale {cfg.softmax_scale:.5f}")
    print(cfg.pattern.describe())
    per_layer = cfg.indexer_params_per_layer * 2
    n_shared = len(cfg.pattern.shared_layers)
    print(f"indexer weights not held by S layers: {n_shared} x {per_layer / 2**20:.1f} MiB = "
          f"{n_shared * per_layer / 2**20:.1f} MiB (bf16)")
    if cfg.pattern.num_full < cfg.num_layers:
        for engine, flag in cfg.pattern.engine_flags().items():
            print(f"  {engine}: {flag}")
    from .engine.kv_cache import bytes_per_token
    from .model.weight_sizes import H200_BYTES, memory_lines

    dtypes = ["bf16", "fp8"] if args.weight_dtype in (None, "auto") else [args.weight_dtype]
    print("\n".join(memory_lines(cfg, dtypes, args.tp, bytes_per_token(cfg, cfg.pattern)["total"], H200_BYTES)))
    if os.path.isdir(args.model):
        _describe_weights(args.model)
    return 0


def _describe_weights(path: str) -> None:
    """One line about the checkpoint's safetensors; a truncated or corrupt file is an error naming it."""
    from .checkpoint import checkpoint_files, inspect_safetensors
    from .tokenizer import find_tokenizer

    if not any(f.endswith(".safetensors") or f == "model.safetensors.index.json" for f in os.listdir(path)):
        print("weights: none (config.json only)")
    else:
        files = checkpoint_files(path)
        heads = [inspect_safetensors(f) for f in files]
        print(f"weights: {len(files)} file{'s' if len(files) > 1 else ''}, {sum(h['tensors'] for h in heads)} "
              f"tensors, {sum(h['bytes'] for h in heads) / 2**20:.1f} MiB (headers checked)")
    tok = find_tokenizer(path)
    print(f"tokenizer: {type(tok).__name__ + ', vocabulary ' + str(tok.vocab_size) if tok else 'none'}"
          + (", chat template" if tok is not None and tok.chat_template else ""))


def _cmd_generate(args) -> int:
    from .llm import LLM
    from .sampling import SamplingParams

    prompts = [_parse_ids(p) if args.token_ids else p for p in args.prompt]
    sp = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                        top_k=args.top_k, seed=args.seed, ignore_eos=args.ignore_eos)
    llm = LLM(args.model, args.pattern, max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
              kv_cache_dtype=args.kv_cache_dtype, enforce_eager=args.enforce_eager, seed=args.seed,
              weight_dtype=args.weight_dtype)
    bpt = llm.cache_bytes_per_token()
    print(f"pattern {llm.pattern} ({bpt['num_full_layers']} full layers); KV cache {bpt['total']} B/token "
          f"({bpt['saving_vs_full_dsa']:.1%} less than full DSA)")
    as_text = not args.json and not args.token_ids and llm.tokenizer is not None
    for out in llm.generate(prompts, sp):
        o = out.outputs[0]
        ttft = out.metrics.get("ttft_s")
        if as_text:  # the prompt and its continuation as plain text, then one status line
            print(f"{out.prompt}{o.text}")
            print(f"--- {len(o.token_ids)} tokens, finish {o.finish_reason}, ttft {ttft:.3f} s")
        else:
            print(json.dumps({"prompt": out.prompt, "text": o.text, "token_ids": o.token_ids,
                              "finish_reason": o.finish_reason, "ttft_s": ttft}))
    return 0


def _parse_ids(prompt: str) -> list[int]:
    ids = []
    for t in prompt.split(","):
        try:
            ids.append(int(t))
        except ValueError:
            raise ValueError(f"--token-ids prompt {prompt!r}: {t!r} is not an integer token id") from None
    return ids


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="indexcache", description="IndexCache for DeepSeek-Sparse-Attention models: "
                                "reuse top-k indices across layers.",
                                epilog="GPU benchmarks are scripts of a clone, not commands: python -m benchmarks.e2e "
                                "--quick (see benchmarks/).")
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="run full DSA and IndexCache patterns on the embedded tiny model (CPU)")
    d.add_argument("--model", default="tiny", help="preset or checkpoint folder (default: tiny)")
    d.add_argument("--seq-len", type=int, default=384)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--patterns", nargs="+", default=["1/2", "1/4"], help="patterns to compare with full DSA")
    d.add_argument("--json", help="also write the results to this JSON file")
    d.set_defaults(func=_cmd_demo)
    i = sub.add_parser("info", help="describe a checkpoint or preset and its layer pattern (with engine flags)")
    i.add_argument("model")
    i.add_argument("--pattern", help="F/S string or 1/N to describe instead of the checkpoint's own")
    i.add_argument("--weight-dtype", choices=["auto", "fp8", "bf16"], help="weight bytes for this (default: both)")
    i.add_argument("--tp", type=int, default=1, help="GPUs the weights are split over (tensor parallel)")
    i.set_defaults(func=_cmd_info)
    g = sub.add_parser("generate", help="generate with the IndexCache engine (presets take token ids)")
    g.add_argument("model", help="checkpoint folder or preset name")
    g.add_argument("prompt", nargs="+", help="prompts (with --token-ids: comma-separated token ids)")
    g.add_argument("--pattern", default=None, help="F/S string, 1/N or all (default: the checkpoint's)")
    g.add_argument("--token-ids", action="store_true")
    g.add_argument("--max-tokens", type=int, default=32)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--ignore-eos", action="store_true")
    g.add_argument("--max-model-len", type=int, default=None,
                   help="longest prompt + output (default: the model's max_position_embeddings)")
    g.add_argument("--max-num-seqs", type=int, default=16)
    g.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32", "fp8"])
    g.add_argument("--enforce-eager", action="store_true")
    g.add_argument("--weight-dtype", default="auto", choices=["auto", "fp8", "bf16"],
                   help="FP8 (128x128 block scales) or bf16 linear/expert weights; auto keeps FP8 checkpoints FP8 "
                        "on a GPU with the block-scaled FP8 GEMM (Hopper)")
    g.add_argument("--json", action="store_true", help="one JSON line per prompt (the default for token-id prompts "
                   "and models without a tokenizer); text prompts otherwise print as plain text")
    g.set_defaults(func=_cmd_generate)
    from .server.cli import register as register_server
    from .tools.cli import register as register_tools

    register_tools(sub)  # train, overlap, search, distill, eval
    register_server(sub)  # serve
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ValueError as e:  # configuration, pattern and checkpoint errors carry their own clear message
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
