"""The OpenAI request fields the server accepts, validated by hand so that every 400 names the field and its value.

Parsing does not need the model: checks that do (prompt length, vocabulary, model name) are in app.py.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

MAX_LOGPROBS = 20
UNSUPPORTED_NONZERO = ("presence_penalty", "frequency_penalty")


class APIError(Exception):
    """An OpenAI-style error response."""

    def __init__(self, status: int, message: str, param: str | None = None, type: str = "invalid_request_error",
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.headers = status, message, param, type, headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.status}}


def bad(param: str, message: str) -> APIError:
    return APIError(400, message, param)


@dataclass
class GenerationRequest:
    chat: bool
    model: str | None
    prompts: list = field(default_factory=list)   # completions: strings or token-id lists (one choice set each)
    messages: list | None = None                  # chat
    max_tokens: int | None = None                 # None: the default (16 for completions, the rest of the context)
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    n: int = 1
    stream: bool = False
    include_usage: bool = False
    logprobs: int | None = None                   # top alternatives per token (0: only the sampled token's)
    ignore_eos: bool = False


def parse_json(raw: bytes) -> dict:
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise bad("body", f"the request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise bad("body", f"the request body must be a JSON object, got {type(body).__name__}")
    return body


def parse_request(body: dict, chat: bool) -> GenerationRequest:
    r = GenerationRequest(chat=chat, model=_opt(body, "model", str))
    if chat:
        r.messages = _messages(body.get("messages"))
        max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
        key = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    else:
        r.prompts = _prompts(body.get("prompt"))
        max_tokens, key = body.get("max_tokens"), "max_tokens"
    if max_tokens is not None:
        r.max_tokens = _int(key, max_tokens, lo=1)
    r.temperature = _float(body, "temperature", 1.0, lo=0.0)
    r.top_p = _float(body, "top_p", 1.0)
    if not 0 < r.top_p <= 1:
        raise bad("top_p", f"top_p must be in (0, 1], got {r.top_p}")
    top_k = body.get("top_k")
    r.top_k = 0 if top_k is None or top_k == -1 else _int("top_k", top_k, lo=0)  # -1 and 0 mean off (vLLM)
    if body.get("seed") is not None:
        r.seed = _int("seed", body["seed"], lo=0, hi=2**63 - 1)
    r.stop = _stop(body.get("stop"))
    if body.get("n") is not None:
        r.n = _int("n", body["n"], lo=1, hi=128)
    r.stream = _opt(body, "stream", bool) or False
    opts = body.get("stream_options")
    if opts is not None:
        if not isinstance(opts, dict):
            raise bad("stream_options", f"stream_options must be an object, got {opts!r:.100}")
        if not r.stream:
            raise bad("stream_options", "stream_options is only allowed with stream=true")
        r.include_usage = bool(opts.get("include_usage", False))
    r.logprobs = _logprobs(body, chat)
    r.ignore_eos = _opt(body, "ignore_eos", bool) or False
    for key in UNSUPPORTED_NONZERO:
        v = body.get(key)
        if v not in (None, 0, 0.0):
            raise bad(key, f"{key}={v!r} is not supported (only 0)")
    if body.get("logit_bias"):
        raise bad("logit_bias", "logit_bias is not supported")
    return r


# ----- field parsers ----------------------------------------------------------------------------------------------
def _opt(body: dict, key: str, typ):
    v = body.get(key)
    if v is not None and not isinstance(v, typ):
        raise bad(key, f"{key} must be a {typ.__name__}, got {v!r:.100}")
    return v


def _int(key: str, v, lo: int | None = None, hi: int | None = None) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise bad(key, f"{key} must be an integer, got {v!r:.100}")
    if lo is not None and v < lo:
        raise bad(key, f"{key} must be >= {lo}, got {v}")
    if hi is not None and v > hi:
        raise bad(key, f"{key} must be <= {hi}, got {v}")
    return v


def _float(body: dict, key: str, default: float, lo: float | None = None) -> float:
    v = body.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise bad(key, f"{key} must be a finite number, got {v!r:.100}")
    if lo is not None and v < lo:
        raise bad(key, f"{key} must be >= {lo}, got {v}")
    return float(v)


def _prompts(p) -> list:
    """A string, a token-id list, or a list of either (a batch)."""
    if p is None:
        raise bad("prompt", "prompt is required")
    if isinstance(p, str) or (isinstance(p, list) and p and all(_is_id(t) for t in p)):
        p = [p]
    if not isinstance(p, list) or not p:
        raise bad("prompt", f"prompt must be a non-empty string, token-id list, or list of those; got {p!r:.100}")
    for x in p:
        if isinstance(x, str):
            if not x:
                raise bad("prompt", "prompt is empty")
        elif isinstance(x, list):
            if not x:
                raise bad("prompt", "prompt is empty (no token ids)")
            wrong = [t for t in x if not _is_id(t)]
            if wrong:
                raise bad("prompt", f"prompt token ids must be integers, got {wrong[0]!r:.100}")
        else:
            raise bad("prompt", f"prompt entries must be strings or token-id lists, got {x!r:.100}")
    return p


def _is_id(t) -> bool:
    return isinstance(t, int) and not isinstance(t, bool)


def _messages(m) -> list:
    if not isinstance(m, list) or not m:
        raise bad("messages", f"messages must be a non-empty list of {{role, content}} objects, got {m!r:.100}")
    out = []
    for i, msg in enumerate(m):
        if not isinstance(msg, dict) or not isinstance(msg.get("role"), str):
            raise bad(f"messages[{i}]", f"messages[{i}] must be an object with a string 'role', got {msg!r:.100}")
        content = msg.get("content")
        if isinstance(content, list):  # content parts: only text is understood
            texts = []
            for part in content:
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise bad(f"messages[{i}].content", f"only text content parts are supported, got {part!r:.100}")
                texts.append(part["text"])
            msg = {**msg, "content": "".join(texts)}
        elif content is not None and not isinstance(content, str):
            raise bad(f"messages[{i}].content", f"messages[{i}].content must be a string, got {content!r:.100}")
        out.append(msg)
    return out


def _stop(s) -> list[str]:
    if s is None:
        return []
    stops = [s] if isinstance(s, str) else s
    if not isinstance(stops, list) or not all(isinstance(x, str) for x in stops):
        raise bad("stop", f"stop must be a string or a list of strings, got {s!r:.100}")
    return [x for x in stops if x]


def _logprobs(body: dict, chat: bool) -> int | None:
    if chat:  # logprobs: bool, top_logprobs: 0..20
        lp = _opt(body, "logprobs", bool)
        top = body.get("top_logprobs")
        if top is not None:
            top = _int("top_logprobs", top, lo=0, hi=MAX_LOGPROBS)
            if not lp:
                raise bad("top_logprobs", "top_logprobs needs logprobs=true")
        return (top or 0) if lp else None
    lp = body.get("logprobs")  # completions: an integer count of alternatives
    return None if lp is None else _int("logprobs", lp, lo=0, hi=MAX_LOGPROBS)
