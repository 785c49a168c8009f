"""OpenAI response bodies (whole and streamed) built from engine events, one ``Choice`` per generated sequence."""
from __future__ import annotations

import json
import time

from .detokenizer import IncrementalDetokenizer
from .engine_loop import Event


class Choice:
    def __init__(self, index: int, prompt_index: int, tokenizer, stop: list[str], chat: bool):
        self.index, self.prompt_index, self.chat = index, prompt_index, chat
        self.detok = IncrementalDetokenizer(tokenizer)
        self.holdback = max((len(s) for s in stop), default=1) - 1  # a stop string may be completing
        self.sent = ""
        self.token_ids: list[int] = []
        self.logprobs: list = []
        self.finish_reason: str | None = None
        self.stop_reason = None
        self.num_cached_tokens = 0
        self.text_offset = 0  # completions logprobs: where each token's text starts

    def feed(self, ev: Event) -> tuple[str, list]:
        """The text safe to show after this event (never past a stop string) and the event's logprob entries."""
        lps = []
        for t, lp in zip(ev.token_ids, ev.logprobs or ()):
            lps.append(self._logprob_entry(t, lp, self.token_ids[-1] if self.token_ids else None))
            self.token_ids.append(t)
        self.token_ids += ev.token_ids[len(lps):]
        self.num_cached_tokens = ev.num_cached_tokens
        self.detok.add(ev.token_ids)
        self.logprobs += lps
        if ev.finish_reason is not None:
            self.finish_reason, self.stop_reason = ev.finish_reason, ev.stop_reason
            text = ev.stop_text if ev.stop_text is not None else self.detok.flush()
        else:
            text = self.detok.text
            if self.holdback:
                text = text[:max(len(self.sent), len(text) - self.holdback)]
        delta = text[len(self.sent):] if text.startswith(self.sent) else ""
        self.sent += delta
        return delta, lps

    def _logprob_entry(self, tok: int, lp, prev: int | None) -> dict:
        chosen, ids, vals = lp
        s = self.detok.token_text(tok, prev)
        top = [(self.detok.token_text(i, prev), v) for i, v in zip(ids, vals)]
        if self.chat:
            return {"token": s, "logprob": chosen, "bytes": list(s.encode()),
                    "top_logprobs": [{"token": t, "logprob": v, "bytes": list(t.encode())} for t, v in top]}
        self.text_offset += len(s)
        return {"token": s, "logprob": chosen, "top": dict(top), "offset": self.text_offset - len(s)}

    def logprobs_body(self, entries: list) -> dict | None:
        if not entries and not self.logprobs:
            return None
        if self.chat:
            return {"content": entries}
        return {"tokens": [e["token"] for e in entries], "token_logprobs": [e["logprob"] for e in entries],
                "top_logprobs": [e["top"] for e in entries], "text_offset": [e["offset"] for e in entries]}


def usage(choices: list[Choice], prompt_lens: list[int]) -> dict:
    cached = sum(next((c.num_cached_tokens for c in choices if c.prompt_index == p), 0)
                 for p in range(len(prompt_lens)))
    completion = sum(len(c.token_ids) for c in choices)
    return {"prompt_tokens": sum(prompt_lens), "completion_tokens": completion,
            "total_tokens": sum(prompt_lens) + completion, "prompt_tokens_details": {"cached_tokens": cached}}


def whole_response(rid: str, model: str, chat: bool, choices: list[Choice], prompt_lens: list[int]) -> dict:
    out = []
    for c in choices:
        lp = c.logprobs_body(c.logprobs) if c.logprobs else None
        if chat:
            out.append({"index": c.index, "message": {"role": "assistant", "content": c.sent}, "logprobs": lp,
                        "finish_reason": c.finish_reason, "stop_reason": c.stop_reason})
        else:
            out.append({"index": c.index, "text": c.sent, "logprobs": lp, "finish_reason": c.finish_reason,
                        "stop_reason": c.stop_reason})
    return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
            "model": model, "choices": out, "usage": usage(choices, prompt_lens)}


def chunk(rid: str, model: str, chat: bool, choice_bodies: list[dict], include_usage: bool,
          usage_body: dict | None = None) -> str:
    body = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion", "created": int(time.time()),
            "model": model, "choices": choice_bodies}
    if include_usage:
        body["usage"] = usage_body
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


def choice_chunk(c: Choice, delta: str, lps: list, chat: bool, first: bool = False) -> dict:
    lp = c.logprobs_body(lps) if lps else None
    if chat:
        d = {"role": "assistant", "content": delta} if first else ({"content": delta} if delta else {})
        return {"index": c.index, "delta": d, "logprobs": lp, "finish_reason": c.finish_reason}
    return {"index": c.index, "text": delta, "logprobs": lp, "finish_reason": c.finish_reason}
