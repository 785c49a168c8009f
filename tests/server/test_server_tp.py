"""``indexcache serve -tp 2 --enable-expert-parallel`` (two gloo ranks): the same greedy tokens and log-probabilities
as one process, page counts on /metrics, and no rank process left once the server is stopped."""
import json
import os
import time
import urllib.request

import pytest

from .fixtures import ServerProcess, metrics


def _children(pid: int) -> list[int]:
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        out.append(int(d))
            except (OSError, ValueError, IndexError):
                pass
    return out


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_serve_tp2_matches_one_process_and_ends_its_ranks(checkpoint, tmp_path):
    from indexcache import LLM, SamplingParams

    server = ServerProcess(checkpoint, str(tmp_path / "tp2.log"), "-tp", "2", "--enable-expert-parallel",
                           "--max-model-len", "256", "--device", "cpu")
    try:
        prompt = [5, 77, 300, 12, 9, 401, 33, 250]
        with LLM(checkpoint, device="cpu") as llm:  # the one-process reference, while the server starts
            seq = llm.engine.add_request(prompt, SamplingParams(temperature=0.0, max_tokens=8, logprobs=2))
            while llm.engine.has_unfinished():
                llm.engine.step()
            want_text = llm.tokenizer.decode(seq.output_ids, skip_special_tokens=True)
        server.wait_ready()
        assert "2 tensor-parallel ranks" in server.output()
        ranks = [p for p in _children(server.proc.pid) if _running(p)]
        assert len(ranks) >= 2, ranks  # the two ranks (and multiprocessing's resource tracker)
        body = json.dumps({"model": checkpoint, "prompt": prompt, "max_tokens": 8, "temperature": 0,
                           "logprobs": 2}).encode()
        req = urllib.request.Request(server.url + "/v1/completions", body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as r:
            got = json.loads(r.read())
        choice = got["choices"][0]
        assert got["usage"]["completion_tokens"] == len(seq.output_ids)
        assert choice["text"] == want_text
        assert choice["logprobs"]["token_logprobs"] == pytest.approx([lp[0] for lp in seq.logprobs], rel=1e-4,
                                                                     abs=1e-5)
        tops = [sorted(t.values(), reverse=True) for t in choice["logprobs"]["top_logprobs"]]
        assert tops == [pytest.approx(sorted(lp[2], reverse=True), rel=1e-4, abs=1e-5) for lp in seq.logprobs]
        m = metrics(server.url, api_key=None)
        assert m["indexcache:kv_pages_total"] > 0 and m["indexcache:kv_pages_free"] == m["indexcache:kv_pages_total"]
        assert m["indexcache:generation_tokens_total"] == len(seq.output_ids)
    finally:
        server.stop()
    assert server.proc.returncode is not None
    end = time.monotonic() + 10
    while any(_running(p) for p in ranks) and time.monotonic() < end:
        time.sleep(0.2)
    assert not [p for p in ranks if _running(p)], server.output()
