"""The ``indexcache`` command line."""
from __future__ import annotations

import argparse
import json
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
    import os

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
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="indexcache", description="IndexCache for DeepSeek-Sparse-Attention models: "
                                "reuse top-k indices across layers.")
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
    from .engine.cli import register as register_engine
    from .tools.cli import register as register_tools

    register_engine(sub)  # generate, bench
    register_tools(sub)  # train, overlap, search, distill, eval
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
