"""``indexcache serve MODEL``: the CLI options (every engine option ``LLM`` takes) and the launcher.

Imported when the CLI builds its parser, so it imports neither FastAPI nor uvicorn until ``serve`` runs."""
from __future__ import annotations

import argparse
import dataclasses
import inspect
import os
import sys

from ..engine.config import EngineConfig
from ..llm import LLM

DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def add_engine_arguments(p: argparse.ArgumentParser) -> None:
    """One ``--flag`` per ``EngineConfig`` field (so a new field is a new flag). Flags not given are not passed, so
    ``LLM``'s own defaults apply (max_model_len: the model's length)."""
    g = p.add_argument_group("engine options (EngineConfig)")
    for f in dataclasses.fields(EngineConfig):
        flag = "--" + f.name.replace("_", "-")
        typ = str(f.type)
        default = "the model's length" if f.name == "max_model_len" else f.default
        if typ.startswith("bool"):
            g.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                           help=f"(default: {default})")
        else:
            conv = int if typ.startswith("int") else float if typ.startswith("float") else str
            g.add_argument(flag, type=conv, default=argparse.SUPPRESS, help=f"(default: {default})")


def llm_keywords() -> dict[str, inspect.Parameter]:
    """``LLM``'s keyword-only options other than the ones ``serve`` spells out itself (e.g. a weight format)."""
    own = {"device", "dtype", "seed", "tokenizer"}
    return {n: p for n, p in inspect.signature(LLM.__init__).parameters.items()
            if p.kind is p.KEYWORD_ONLY and n not in own}


def add_llm_arguments(p: argparse.ArgumentParser) -> None:
    for name, prm in llm_keywords().items():
        flag, default = "--" + name.replace("_", "-"), prm.default
        if isinstance(default, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                           help=f"LLM option (default: {default})")
        else:
            conv = type(default) if isinstance(default, (int, float, str)) else str
            p.add_argument(flag, type=conv, default=argparse.SUPPRESS, help=f"LLM option (default: {default})")


def engine_options(args) -> dict:
    """The engine and LLM options given on the command line (the others keep their defaults)."""
    names = [f.name for f in dataclasses.fields(EngineConfig)] + list(llm_keywords())
    return {n: getattr(args, n) for n in names if hasattr(args, n)}


def register(subparsers) -> None:
    s = subparsers.add_parser("serve", help="an OpenAI-compatible HTTP server (/v1/completions, /v1/chat/completions)")
    s.add_argument("model", help="checkpoint folder (with tokenizer files for text prompts) or preset name")
    s.add_argument("--index-pattern", default=None, help="F/S string, 1/N or all (default: the checkpoint's)")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--api-key", default=os.environ.get("INDEXCACHE_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on every route but /health (default: "
                        "$INDEXCACHE_API_KEY)")
    s.add_argument("--served-model-name", default=None, help="the model id clients send (default: MODEL as given)")
    s.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the checkpoint folder)")
    s.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    s.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="weights (default: bf16 on CUDA, else fp32)")
    s.add_argument("--max-waiting-requests", type=int, default=256,
                   help="requests not yet started beyond which new ones get 503 + Retry-After")
    s.add_argument("--max-body-bytes", type=int, default=16 << 20, help="request body limit (413 past it)")
    s.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    add_llm_arguments(s)
    add_engine_arguments(s)
    s.set_defaults(func=_cmd_serve)


def _cmd_serve(args) -> int:
    import torch
    import uvicorn

    from ..llm import LLM
    from .app import Server, create_app

    if not 0 < args.port < 65536:
        raise ValueError(f"--port must be in 1..65535, got {args.port}")
    if args.max_body_bytes < 1:
        raise ValueError(f"--max-body-bytes must be >= 1, got {args.max_body_bytes}")
    dtype = getattr(torch, DTYPES[args.dtype]) if args.dtype else None
    opts = engine_options(args)
    llm = LLM(args.model, args.index_pattern, device=args.device, dtype=dtype, tokenizer=args.tokenizer,
              seed=opts.pop("seed", 0), **opts)
    server = Server(llm.engine, llm.tokenizer, args.served_model_name or args.model, api_key=args.api_key,
                    max_body_bytes=args.max_body_bytes, max_waiting=args.max_waiting_requests)
    where = f"http://{args.host}:{args.port}"
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
        print(f"warning: listening on {args.host} without --api-key: anyone who can reach this port can use the "
              "model", file=sys.stderr)
    print(f"serving {server.model_name!r} (pattern {llm.pattern}, {llm.engine.blocks.num_blocks} KV pages of "
          f"{llm.engine.cfg.page_size}) on {where}" + (" with an API key" if args.api_key else ""), file=sys.stderr)
    uvicorn.run(create_app(server), host=args.host, port=args.port, log_level=args.log_level,
                timeout_graceful_shutdown=5)
    return 0
