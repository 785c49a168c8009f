"""The server as a client sees it: a real process on 127.0.0.1, driven by the official openai client and httpx."""
import json
import os
import threading
import time

import httpx
import pytest
from tokenizers import Tokenizer

from .conftest import MAX_BODY, MAX_MODEL_LEN
from .fixtures import API_KEY, metrics

openai = pytest.importorskip("openai")  # a test-only dependency (the GPU image lacks it)

AUTH = {"Authorization": f"Bearer {API_KEY}"}
PROMPT = "Kato rime sushu pela"


def post(server, route, body, headers=AUTH, raw=None, timeout=30):
    return httpx.post(server.url + route, content=raw if raw is not None else json.dumps(body), timeout=timeout,
                      headers={**headers, "Content-Type": "application/json"})


def wait_idle(server, timeout=15.0, api_key=API_KEY):
    """Until nothing runs or waits and every KV page is free; returns the metrics."""
    end = time.monotonic() + timeout
    while True:
        m = metrics(server.url, api_key)
        idle = (m["indexcache:num_requests_running"] == 0 and m["indexcache:num_requests_waiting"] == 0
                and m["indexcache:kv_pages_used"] == 0)
        if idle or time.monotonic() > end:
            return m
        time.sleep(0.1)


def test_health_models_and_api_key(server, client):
    assert httpx.get(server.url + "/health").status_code == 200  # no key needed
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}):
        r = httpx.get(server.url + "/v1/models", headers=headers)
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        assert post(server, "/v1/completions", {"prompt": "a"}, headers=headers).status_code == 401
    assert httpx.get(server.url + "/metrics").status_code == 401
    models = client.models.list().data
    assert [m.id for m in models] == ["tiny"]


def test_completion_greedy_and_prefix_cache(server, client):
    a = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=8, temperature=0)
    b = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=8, temperature=0)
    assert a.choices[0].text == b.choices[0].text and a.choices[0].text.strip()
    assert a.choices[0].finish_reason == "length" and a.usage.completion_tokens == 8
    ids = client.completions.create(model="tiny", prompt=[5, 6, 7], max_tokens=3, temperature=0)
    assert ids.usage.prompt_tokens == 3 and ids.usage.completion_tokens == 3
    # a long shared prefix: the second request finds its full pages in the cache (page size 16)
    doc = list(range(10, 110))
    first = client.completions.create(model="tiny", prompt=doc + [1, 2], max_tokens=2, temperature=0)
    second = client.completions.create(model="tiny", prompt=doc + [3, 4, 5], max_tokens=2, temperature=0)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    assert second.usage.prompt_tokens_details.cached_tokens == 96
    assert wait_idle(server)["indexcache:prefix_cache_hits_total"] >= 96


def test_metrics(server, client):
    client.completions.create(model="tiny", prompt=PROMPT, max_tokens=4, temperature=0)
    m = wait_idle(server)
    for key in ("num_requests_running", "num_requests_waiting", "kv_pages_used", "kv_pages_free",
                "prefix_cache_hit_rate", "generation_tokens_per_second"):
        assert f"indexcache:{key}" in m
    assert m["indexcache:kv_pages_free"] == m["indexcache:kv_pages_total"] == 160
    assert m["indexcache:time_to_first_token_seconds_count"] >= 1
    assert m["indexcache:inter_token_latency_seconds_count"] >= 3
    assert m["indexcache:generation_tokens_total"] >= 4 and m["indexcache:generation_tokens_per_second"] > 0
    text = httpx.get(server.url + "/metrics", headers=AUTH).text
    assert '# TYPE indexcache:time_to_first_token_seconds histogram' in text and 'le="+Inf"' in text


def test_chat(client, checkpoint):
    r = client.chat.completions.create(model="tiny", max_tokens=6, temperature=0,
                                       messages=[{"role": "system", "content": "Be brief."},
                                                 {"role": "user", "content": "Kato rime?"}])
    c = r.choices[0]
    assert c.message.role == "assistant" and c.message.content and c.finish_reason == "length"
    assert r.usage.completion_tokens == 6
    # the prompt is the checkpoint's chat template, rendered and tokenized
    tok = Tokenizer.from_file(os.path.join(checkpoint, "tokenizer.json"))
    rendered = "<|system|>Be brief.\n<|user|>Kato rime?\n<|assistant|>"
    assert r.usage.prompt_tokens == len(tok.encode(rendered, add_special_tokens=False).ids)


def test_streaming_with_usage(client):
    whole = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=12, temperature=0)
    chunks = list(client.completions.create(model="tiny", prompt=PROMPT, max_tokens=12, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole.choices[0].text
    assert len([c for c in chunks if c.choices]) > 3  # token by token, not one blob
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert all(c.usage is None for c in chunks[:-1])
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    chat = list(client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Ka?"}],
                                               max_tokens=5, temperature=0, stream=True,
                                               stream_options={"include_usage": True}))
    assert chat[0].choices[0].delta.role == "assistant"
    assert chat[-1].usage.completion_tokens == 5 and chat[-1].usage.total_tokens == chat[-1].usage.prompt_tokens + 5


def test_stop_strings(client):
    full = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=40, temperature=0).choices[0].text
    at = next(i for i in range(6, len(full) - 3) if full.find(full[i:i + 3]) == i)  # a first occurrence
    stop = full[at:at + 3]
    r = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=40, temperature=0, stop=[stop, "@@"])
    assert r.choices[0].text == full[:at] and r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens < 40
    streamed = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=40, temperature=0, stop=stop,
                                         stream=True)
    parts = [c.choices[0] for c in streamed if c.choices]
    assert "".join(p.text for p in parts) == full[:at]  # nothing past the stop string was ever sent
    assert parts[-1].finish_reason == "stop"


def test_logprobs(client):
    r = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=6, temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 6
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs):
        assert chosen < 0 and len(top) <= 3 and max(top.values()) == pytest.approx(chosen)  # greedy takes the top
    assert "".join(lp.tokens).strip() == r.choices[0].text.strip()
    c = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Ka"}], max_tokens=4,
                                       temperature=0.7, seed=1, logprobs=True, top_logprobs=2)
    content = c.choices[0].logprobs.content
    assert len(content) == 4 and all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in content)
    plain = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=2)
    assert plain.choices[0].logprobs is None


def test_n_and_seed(client, checkpoint):
    kw = dict(model="tiny", prompt=PROMPT, max_tokens=10, temperature=1.0, seed=7, n=3, extra_body={"ignore_eos": True})
    a, b = client.completions.create(**kw), client.completions.create(**kw)
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert [c.text for c in a.choices] == [c.text for c in b.choices]  # seeded: reproducible
    assert len({c.text for c in a.choices}) > 1  # the choices are different samples
    assert a.usage.completion_tokens == 30
    # a batch of prompts x n choices, streamed: indices prompt * n + choice, each choice's text as if whole
    kw = dict(model="tiny", prompt=[PROMPT, [5, 6, 7]], max_tokens=6, temperature=0, n=2)
    whole = client.completions.create(**kw)
    texts = {}
    for c in client.completions.create(stream=True, **kw):
        texts[c.choices[0].index] = texts.get(c.choices[0].index, "") + c.choices[0].text
    assert sorted(texts) == [0, 1, 2, 3] and [texts[i] for i in range(4)] == [c.text for c in whole.choices]
    assert whole.choices[0].text == whole.choices[1].text != whole.choices[2].text  # greedy: same per prompt
    assert whole.usage.prompt_tokens == len(Tokenizer.from_file(os.path.join(checkpoint, "tokenizer.json"))
                                            .encode(PROMPT).ids) + 3


def test_client_disconnect_frees_pages(server):
    before = metrics(server.url).get("indexcache:request_success_total[abort]", 0)
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 480, "temperature": 0, "ignore_eos": True,
            "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, headers=AUTH, timeout=30) as r:
        lines = r.iter_lines()
        got = [next(lines) for _ in range(6)]  # a few tokens, then the client goes away
    assert any(g.startswith("data: ") for g in got)
    with pytest.raises(httpx.ReadTimeout):  # the same for a whole (non-streamed) response
        post(server, "/v1/completions", {**body, "stream": False}, timeout=1.0)
    m = wait_idle(server)
    assert m["indexcache:kv_pages_used"] == 0 and m["indexcache:num_requests_running"] == 0
    assert m["indexcache:request_success_total[abort]"] == before + 2


BAD = [
    ("/v1/completions", {"prompt": list(range(300)) * 2}, "prompt", ["600", str(MAX_MODEL_LEN)]),
    ("/v1/completions", {"prompt": PROMPT, "max_tokens": 0}, "max_tokens", ["0"]),
    ("/v1/completions", {"prompt": PROMPT, "temperature": -0.5}, "temperature", ["-0.5"]),
    ("/v1/completions", {"prompt": PROMPT, "top_p": 0}, "top_p", ["0"]),
    ("/v1/completions", {"prompt": PROMPT, "top_p": 1.5}, "top_p", ["1.5"]),
    ("/v1/completions", {"prompt": PROMPT, "model": "gpt-9"}, "model", ["gpt-9"]),
    ("/v1/completions", {"prompt": [1, 2, 512]}, "prompt", ["512"]),
    ("/v1/completions", {"prompt": [-1]}, "prompt", ["-1"]),
    ("/v1/completions", {"prompt": ""}, "prompt", ["empty"]),
    ("/v1/completions", {"prompt": []}, "prompt", []),
    ("/v1/completions", {"prompt": PROMPT, "max_tokens": 510}, "max_tokens", ["510", str(MAX_MODEL_LEN)]),
    ("/v1/completions", {"prompt": PROMPT, "n": 0}, "n", ["0"]),
    ("/v1/completions", {"prompt": PROMPT, "logprobs": 50}, "logprobs", ["50"]),
    ("/v1/completions", {"prompt": PROMPT, "stop": 3}, "stop", ["3"]),
    ("/v1/completions", {}, "prompt", []),
    ("/v1/chat/completions", {"messages": []}, "messages", []),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "temperature": -1}, "temperature",
     ["-1"]),
    ("/v1/chat/completions", {"messages": [{"content": "x"}]}, "messages[0]", []),
]


@pytest.mark.parametrize("route,body,param,mentions", BAD, ids=[f"{b[2]}-{i}" for i, b in enumerate(BAD)])
def test_bad_input_is_a_400_naming_field_and_value(server, route, body, param, mentions):
    r = post(server, route, {"model": "tiny", **body})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["type"] == "invalid_request_error"
    for m in mentions:
        assert m in err["message"], err["message"]


def test_malformed_json_and_body_limit(server, client):
    r = post(server, "/v1/completions", None, raw=b'{"prompt": "a", ')
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    r = post(server, "/v1/completions", None, raw=json.dumps({"prompt": "a" * (MAX_BODY + 10)}).encode())
    assert r.status_code == 413 and str(MAX_BODY) in r.json()["error"]["message"]
    with pytest.raises(openai.BadRequestError, match="temperature"):  # what an openai client user sees
        client.completions.create(model="tiny", prompt=PROMPT, temperature=-2)
    assert wait_idle(server)["indexcache:kv_pages_used"] == 0


def test_full_waiting_queue_is_a_503(servers):
    busy = servers["busy"]
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 60, "temperature": 0, "ignore_eos": True}
    results = [None] * 6

    def go(i):
        results[i] = httpx.post(busy.url + "/v1/completions", json=body, timeout=60)

    threads = [threading.Thread(target=go, args=(i,)) for i in range(6)]
    threads[0].start()
    end = time.monotonic() + 30
    while metrics(busy.url, None)["indexcache:num_requests_running"] < 1 and time.monotonic() < end:
        time.sleep(0.05)
    for t in threads[1:]:  # one running: one more may wait, the other four are refused
        t.start()
    for t in threads:
        t.join(90)
    codes = sorted(r.status_code for r in results)
    assert codes == [200, 200, 503, 503, 503, 503], codes
    refused = next(r for r in results if r.status_code == 503)
    assert refused.headers["Retry-After"] == "1" and "busy" in refused.json()["error"]["message"]
    done = [r.json() for r in results if r.status_code == 200]
    assert all(d["usage"]["completion_tokens"] == 60 for d in done)
    assert wait_idle(busy, api_key=None)["indexcache:kv_pages_used"] == 0
