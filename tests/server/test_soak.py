"""A bounded soak: 32 concurrent clients for 60 s with random prompt/output lengths, some streaming, some cancelled.

Pass: every request completes with its requested number of tokens (or a stop reason) or gets a clean error; none
hangs; afterwards every KV page is free and the server's memory grew < 10%."""
import random
import statistics
import threading
import time

import httpx
import pytest

from .fixtures import API_KEY, corpus, metrics

openai = pytest.importorskip("openai")  # a test-only dependency (the GPU image lacks it)

CLIENTS = 32
DURATION_S = 60.0
REQUEST_TIMEOUT_S = 60.0


DOCUMENTS = [" ".join(corpus(12, seed=100 + i)) for i in range(3)]  # shared prefixes: questions about documents
WARMUP_S = 15.0  # memory is compared from here on (the allocator first grows to the working set)


def _one(client, http, url, rng, stats):
    sentences = corpus(40, seed=rng.randrange(1 << 30))
    text = " ".join(sentences[:rng.randint(1, 12)])
    kind = rng.random()
    if kind < 0.3:
        prompt = rng.choice(DOCUMENTS) + " " + sentences[0]
    elif kind < 0.7:
        prompt = text
    else:
        prompt = [rng.randrange(512) for _ in range(rng.randint(1, 300))]
    max_tokens = rng.randint(1, 48)
    stream, cancel = rng.random() < 0.5, rng.random() < 0.15
    kw = dict(model="tiny", prompt=prompt, max_tokens=max_tokens, temperature=rng.choice([0, 0.8]),
              seed=rng.randrange(1000))
    t0 = time.monotonic()
    if cancel:  # the client goes away mid-request
        body = {**kw, "stream": stream}
        try:
            if stream:
                with http.stream("POST", url + "/v1/completions", json=body, timeout=REQUEST_TIMEOUT_S) as r:
                    for i, _ in enumerate(r.iter_lines()):
                        if i >= 2:
                            break
            else:
                http.post(url + "/v1/completions", json=body, timeout=rng.uniform(0.05, 0.5))
        except httpx.TimeoutException:
            pass
        stats["cancelled"] += 1
        return
    chat = rng.random() < 0.2 and isinstance(prompt, str)
    if chat:
        kw["messages"] = [{"role": "user", "content": kw.pop("prompt")}]
    api = client.chat.completions if chat else client.completions
    try:
        if stream:
            chunks, first = [], None
            for c in api.create(stream=True, stream_options={"include_usage": True}, **kw):
                if first is None and c.choices and (c.choices[0].delta.content if chat else c.choices[0].text):
                    first = time.monotonic() - t0
                chunks.append(c)
            finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
            usage = chunks[-1].usage
            if first is not None:
                stats["ttft"].append(first)
        else:
            r = api.create(**kw)
            finish, usage = [r.choices[0].finish_reason], r.usage
    except openai.APIStatusError as e:  # a clean, OpenAI-shaped error (e.g. 503 when the queue is full)
        stats["errors"][e.status_code] = stats["errors"].get(e.status_code, 0) + 1
        assert e.status_code in (400, 503), e
        return
    assert len(finish) == 1 and finish[0] in ("length", "stop"), finish
    if finish[0] == "length":
        assert usage.completion_tokens == max_tokens, (usage, max_tokens)
    else:
        assert 1 <= usage.completion_tokens <= max_tokens
    stats["done"] += 1


def test_soak(server):
    start = metrics(server.url)
    stats = {"done": 0, "cancelled": 0, "errors": {}, "ttft": [], "failures": []}
    end = time.monotonic() + DURATION_S

    def worker(i):
        rng = random.Random(i)
        with openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0,
                           timeout=REQUEST_TIMEOUT_S) as client, \
                httpx.Client(headers={"Authorization": f"Bearer {API_KEY}"}) as http:
            while time.monotonic() < end:
                try:
                    _one(client, http, server.url, rng, stats)
                except Exception as e:  # noqa: BLE001 - collected and reported below
                    stats["failures"].append(f"client {i}: {type(e).__name__}: {e}")
                    return

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(CLIENTS)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    time.sleep(WARMUP_S)
    warm = metrics(server.url)
    for t in threads:
        t.join(DURATION_S + REQUEST_TIMEOUT_S + 10)
    elapsed = time.monotonic() - t0
    assert not any(t.is_alive() for t in threads), "a client hung"
    assert not stats["failures"], stats["failures"][:5]

    deadline = time.monotonic() + 20  # cancelled requests are aborted between steps
    while True:
        m = metrics(server.url)
        idle = (m["indexcache:num_requests_running"] == 0 and m["indexcache:num_requests_waiting"] == 0
                and m["indexcache:kv_pages_used"] == 0)
        if idle or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    ttft = sorted(stats["ttft"])
    p50 = statistics.median(ttft) if ttft else float("nan")
    p99 = ttft[min(len(ttft) - 1, int(0.99 * len(ttft)))] if ttft else float("nan")
    growth = m["process_resident_memory_bytes"] / warm["process_resident_memory_bytes"] - 1
    growth_all = m["process_resident_memory_bytes"] / start["process_resident_memory_bytes"] - 1
    print(f"\nsoak: {stats['done']} completed + {stats['cancelled']} cancelled + {sum(stats['errors'].values())} "
          f"clean errors {stats['errors']} in {elapsed:.0f} s = {(stats['done'] + stats['cancelled']) / elapsed:.1f} "
          f"requests/s; TTFT p50 {p50 * 1e3:.0f} ms, p99 {p99 * 1e3:.0f} ms (streamed); "
          f"prefix-cache hit rate {m['indexcache:prefix_cache_hit_rate']:.1%}; "
          f"RSS growth {growth:+.1%} after {WARMUP_S:.0f} s of warm-up "
          f"({growth_all:+.1%} from before the soak)")
    assert idle, {k: v for k, v in m.items() if "requests" in k or "pages" in k}
    assert m["indexcache:kv_pages_free"] == m["indexcache:kv_pages_total"]
    assert stats["done"] >= CLIENTS and stats["cancelled"] > 0
    assert m["indexcache:prefix_cache_hits_total"] > start["indexcache:prefix_cache_hits_total"]
    assert growth < 0.10
