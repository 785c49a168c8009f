"""Prometheus text exposition of the server's state: requests, KV pages, prefix-cache hits, latencies, tokens/s.

The engine thread records (``observe_*``, ``count_*``); ``render()`` runs on the event loop and reads the engine's
counters (plain ints, read whole under the GIL)."""
from __future__ import annotations

import bisect
import os
import threading
import time
from collections import deque

TTFT_BUCKETS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50, 100, 300)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.1, 0.2, 0.5, 1, 2.5, 5)
RATE_WINDOW_S = 10.0
PREFIX = "indexcache"


class Histogram:
    def __init__(self, buckets):
        self.buckets = tuple(buckets)
        self.counts = [0] * (len(self.buckets) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, v: float, times: int = 1) -> None:
        self.counts[bisect.bisect_left(self.buckets, v)] += times
        self.sum += v * times
        self.count += times

    def lines(self, name: str) -> list[str]:
        out, acc = [], 0
        for b, c in zip(self.buckets, self.counts):
            acc += c
            out.append(f'{name}_bucket{{le="{b}"}} {acc}')
        out.append(f'{name}_bucket{{le="+Inf"}} {self.count}')
        return out + [f"{name}_sum {self.sum}", f"{name}_count {self.count}"]


class Metrics:
    def __init__(self, engine, model_name: str):
        self.engine = engine
        self.model_name = model_name.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")  # label escaping
        self.lock = threading.Lock()
        self.ttft = Histogram(TTFT_BUCKETS)
        self.itl = Histogram(ITL_BUCKETS)
        self.e2e = Histogram(TTFT_BUCKETS)
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.finished: dict[str, int] = {}
        self.rejected = 0                            # 503: waiting queue full
        self.queued = 0                              # accepted, not yet handed to the engine (set by the loop)
        self._recent: deque[tuple[float, int]] = deque()  # (time, tokens) of recent steps, for tokens/s

    def observe_tokens(self, ttft: float | None, itl: float | None, n_new: int) -> None:
        with self.lock:
            if ttft is not None:
                self.ttft.observe(ttft)
            if itl is not None and n_new:
                self.itl.observe(itl, n_new)
            self.generation_tokens += n_new
            now = time.monotonic()
            self._recent.append((now, n_new))

    def count_request(self, prompt_tokens: int) -> None:
        with self.lock:
            self.prompt_tokens += prompt_tokens

    def count_finished(self, reason: str, latency: float) -> None:
        with self.lock:
            self.finished[reason] = self.finished.get(reason, 0) + 1
            self.e2e.observe(latency)

    def tokens_per_second(self) -> float:
        now = time.monotonic()
        with self.lock:
            while self._recent and self._recent[0][0] < now - RATE_WINDOW_S:
                self._recent.popleft()
            return sum(n for _, n in self._recent) / RATE_WINDOW_S

    def render(self) -> str:
        e = self.engine
        b = e.blocks
        lab = f'model_name="{self.model_name}"'

        def g(name, help_, value, kind="gauge"):
            return [f"# HELP {PREFIX}:{name} {help_}", f"# TYPE {PREFIX}:{name} {kind}",
                    f"{PREFIX}:{name}{{{lab}}} {value}"]

        def h(name, help_, hist):
            lines = [f"# HELP {PREFIX}:{name} {help_}", f"# TYPE {PREFIX}:{name} histogram"]
            for line in hist.lines(f"{PREFIX}:{name}"):
                head, val = line.rsplit(" ", 1)
                head = head.replace("{", "{" + lab + ",") if "{" in head else head + "{" + lab + "}"
                lines.append(f"{head} {val}")
            return lines

        tps = self.tokens_per_second()
        with self.lock:
            hit = b.hit_tokens / b.query_tokens if b.query_tokens else 0.0
            out = (g("num_requests_running", "requests decoding or prefilling in the batch", len(e.scheduler.running))
                   + g("num_requests_waiting", "requests waiting for their first prefill (queue)",
                       len(e.scheduler.waiting) + self.queued)
                   + g("kv_pages_total", "KV cache pages", b.num_blocks)
                   + g("kv_pages_used", "KV cache pages held by requests", b.num_blocks - b.num_free)
                   + g("kv_pages_free", "KV cache pages free (including unreferenced prefix-cache pages)", b.num_free)
                   + g("kv_pages_cached", "pages holding a findable prefix", b.num_cached)
                   + g("kv_page_size", "tokens per page", b.page_size)
                   + g("prefix_cache_queries_total", "prompt tokens looked up in the prefix cache", b.query_tokens,
                       "counter")
                   + g("prefix_cache_hits_total", "prompt tokens found in the prefix cache", b.hit_tokens, "counter")
                   + g("prefix_cache_hit_rate", "prefix_cache_hits_total / prefix_cache_queries_total", hit)
                   + g("prompt_tokens_total", "prompt tokens of accepted requests", self.prompt_tokens, "counter")
                   + g("generation_tokens_total", "generated tokens", self.generation_tokens, "counter")
                   + g("computed_tokens_total", "tokens run through the model", e.num_computed_tokens, "counter")
                   + g("generation_tokens_per_second", f"generated tokens/s over the last {RATE_WINDOW_S:.0f} s", tps)
                   + g("requests_rejected_total", "requests refused with 503 (waiting queue full)", self.rejected,
                       "counter")
                   + h("time_to_first_token_seconds", "time from arrival to the first token", self.ttft)
                   + h("inter_token_latency_seconds", "time between tokens of a request", self.itl)
                   + h("e2e_request_latency_seconds", "time from arrival to the last token", self.e2e))
            out += [f"# HELP {PREFIX}:request_success_total finished requests by finish reason",
                    f"# TYPE {PREFIX}:request_success_total counter"]
            out += [f'{PREFIX}:request_success_total{{{lab},finished_reason="{r}"}} {n}'
                    for r, n in sorted(self.finished.items())]
        out += ["# HELP process_resident_memory_bytes resident memory of the server process",
                "# TYPE process_resident_memory_bytes gauge", f"process_resident_memory_bytes {resident_bytes()}"]
        return "\n".join(out) + "\n"


def resident_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0
