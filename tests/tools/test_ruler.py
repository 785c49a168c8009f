"""The RULER-style retrieval suite (tools/ruler.py) on the trained fixture (which cannot retrieve: these tests
check that the suite runs, is deterministic, scores exact match right and rejects bad arguments)."""
import json
import os
from types import SimpleNamespace

import pytest
import torch

from indexcache.checkpoint import build_empty, load_model
from indexcache.tools.corpus import ByteTokenizer, load_corpus
from indexcache.tools.ruler import greedy_decode, ruler_suite, score_items
from indexcache.tools.train import TrainConfig
from indexcache.tools.tasks import HELDOUT_SEED_BASE, TaskItem, make_items

FIXTURE = os.path.join(os.path.dirname(os.path.dirname(__file__)), "fixtures", "stdlib-dsa-tiny")
H = HELDOUT_SEED_BASE


@pytest.fixture(scope="module")
def fixture_model():
    return load_model(FIXTURE)


@pytest.fixture(scope="module")
def test_corpus():
    return load_corpus("test")


class Oracle(torch.nn.Module):
    """Predicts the next token of ``seq`` at every position, except ``wrong`` positions (predicts byte 0 there)."""

    def __init__(self, seq, wrong=()):
        super().__init__()
        self.seq, self.wrong = list(seq), set(wrong)

    def forward(self, ids, pattern=None):
        B, T = ids.shape
        logits = torch.zeros(B, T, 260)
        for t in range(T):
            nxt = 0 if t in self.wrong else self.seq[t + 1]
            logits[:, t, nxt] = 1.0
        return SimpleNamespace(logits=logits)


def test_exact_match_scoring_on_a_hand_made_case():
    item = TaskItem("passkey", 9, [256] + list(b"ab = "), b"12]")
    seq = item.prompt + list(item.answer)
    assert score_items(Oracle(seq), [item])[0] == {"task": "passkey", "length": 9, "exact": True,
                                                        "first_byte": True, "answer": "12]", "greedy": "12]"}
    last = score_items(Oracle(seq, wrong={7}), [item])[0]  # position 7 predicts token 8 = the last answer byte
    assert last["exact"] is False and last["first_byte"] is True and last["greedy"] == "12\x00"
    first = score_items(Oracle(seq, wrong={5}), [item])[0]  # position 5 predicts the first answer byte
    assert first["exact"] is False and first["first_byte"] is False and first["greedy"] == "\x00"
    # a prompt-position miss does not count: only the answer is scored
    assert score_items(Oracle(seq, wrong={1}), [item])[0]["exact"] is True
    assert greedy_decode(Oracle(seq), item.prompt, 3) == list(b"12]")


def test_teacher_forced_scoring_equals_step_by_step_greedy(test_corpus):
    tc = TrainConfig(layers=2, hidden=32, heads=2, q_lora=32, kv_lora=32, nope=16, rope=16, v=16, mlp=64, topk=16)
    model = build_empty(tc.model_config(), "cpu", torch.float32).init_random(3)
    items = make_items(test_corpus, ("kv_single", "vartrack"), 300, 2, H, heldout=True)
    # the random model's argmax is arbitrary: make item 0's answer its own greedy output, so both paths are hit
    own = greedy_decode(model, items[0].prompt, len(items[0].answer), "FS")
    items[0] = TaskItem(items[0].task, items[0].length, items[0].prompt, bytes(own))
    scored = score_items(model, items, "FS", batch=2)
    assert scored[0]["exact"] and not all(s["exact"] for s in scored)
    for s, it in zip(scored, items):
        dec = greedy_decode(model, it.prompt, len(it.answer), "FS")
        miss = next((i for i, (a, b) in enumerate(zip(dec, it.answer)) if a != b), len(dec))
        assert s["exact"] == (bytes(dec) == it.answer) == (miss == len(dec))
        assert s["greedy"] == ByteTokenizer().decode(dec[: miss + 1])


def test_suite_runs_and_is_deterministic(fixture_model, test_corpus):
    kw = dict(test=test_corpus, lengths=(256, 300), n_per_task=1, tasks=("passkey", "needle_multi"), batch=2,
              progress=False)
    a = ruler_suite(fixture_model, "FFSSFSSSFSSSFSSS", **kw)
    b = ruler_suite(fixture_model, "FFSSFSSSFSSSFSSS", **kw)
    assert a == b
    assert set(a["tasks"]) == {"passkey", "needle_multi"} and set(a["tasks"]["passkey"]) == {"256", "300"}
    for by_len in a["tasks"].values():
        for v in by_len.values():
            assert v["n"] == 1 and 0.0 <= v["exact_match"] <= v["first_byte"] <= 1.0
    assert a["mean_by_length"]["300"] == pytest.approx(
        (a["tasks"]["passkey"]["300"]["exact_match"] + a["tasks"]["needle_multi"]["300"]["exact_match"]) / 2)


@pytest.mark.parametrize("kw,match", [
    (dict(lengths=(100,)), "lengths must be integers >= 256"),
    (dict(lengths=()), "at least one length"),
    (dict(n_per_task=0), "items per task"),
    (dict(tasks=("kv_single", "bogus")), "unknown retrieval tasks"),
    (dict(seed=3), "held-out items"),
])
def test_suite_rejects_bad_arguments(fixture_model, test_corpus, kw, match):
    args = dict(test=test_corpus, lengths=(300,), n_per_task=1, progress=False) | kw
    with pytest.raises(ValueError, match=match):
        ruler_suite(fixture_model, None, **args)


def test_cli_eval_with_suite(tmp_path, capsys):
    from indexcache.tools.cli import main

    out = tmp_path / "e.json"
    assert main(["eval", FIXTURE, "--patterns", "1/2", "FRSRFSSSSSSSSSSS", "--pool", "64", "--context", "128", "--lengths", "256", "--n-retrieval", "2",
                 "--windows", "1", "--batch", "2", "--suite-lengths", "300", "--suite-n", "1", "--suite-tasks",
                 "vartrack", "--device", "cpu", "--json", str(out)]) == 0
    r, fr = json.loads(out.read_text())["results"]
    assert r["suite"]["tasks"]["vartrack"]["300"]["n"] == 1
    assert fr["num_rerank"] == 2 and fr["pool"] == 64 and [x["type"] for x in fr["layers"][:4]] == list("FRSR")
    assert "vartrack" in capsys.readouterr().out
