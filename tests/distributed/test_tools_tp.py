"""The quality tools with ``-tp 2`` (two gloo ranks) report what they report on one process."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file

from indexcache.tools.cli import main

FIXTURE = os.path.join(os.path.dirname(__file__), "..", "fixtures", "stdlib-dsa-tiny")


def _eval(tmp_path, name, *extra):
    out = tmp_path / f"{name}.json"
    assert main(["eval", FIXTURE, "--patterns", "model", "1/2", "--context", "96", "--lengths", "96",
                 "--n-retrieval", "2", "--windows", "2", "--batch", "2", "--suite-n", "0", "--device", "cpu",
                 "--json", str(out),
                 *extra]) == 0
    return json.loads(out.read_text())["results"]


def test_eval_tp2_matches_one_process(tmp_path):
    one, two = _eval(tmp_path, "tp1"), _eval(tmp_path, "tp2", "-tp", "2")
    for a, b in zip(one, two, strict=True):
        assert a["pattern"] == b["pattern"]
        assert b["heldout"]["loss"] == pytest.approx(a["heldout"]["loss"], rel=1e-5)
        assert b["retrieval"]["96"]["mean_value_logprob"] == pytest.approx(a["retrieval"]["96"]["mean_value_logprob"],
                                                                           rel=1e-5)
        for la, lb in zip(a["layers"], b["layers"], strict=True):
            for key in ("attention_mass_used", "recall_vs_own_indexer", "attention_mass_own"):
                assert lb.get(key) == pytest.approx(la.get(key), abs=1e-5), (la["layer"], key)


def test_distill_tp2_matches_one_process(tmp_path):
    """Two warm-up and two sparse steps (LM loss through the shards, indexers on the gathered targets) at TP=2
    write the same checkpoint as one process."""
    def run(name, *extra):
        out = tmp_path / name
        assert main(["distill", FIXTURE, "--pattern", "1/2", "--out", str(out), "--warmup-steps", "2",
                     "--sparse-steps", "2", "--batch", "2", "--context", "64", "--device", "cpu", *extra]) == 0
        return load_file(str(out / "model.safetensors"))

    one, two = run("tp1"), run("tp2", "-tp", "2")
    src = load_file(os.path.join(FIXTURE, "model.safetensors"))
    assert sorted(two) == sorted(one)
    moved = 0
    for k, a in one.items():
        b = two[k]
        assert b.shape == a.shape, k
        assert torch.allclose(b, a, rtol=1e-5, atol=1e-6), (k, float((b - a).abs().max()))
        moved += not torch.equal(a, src[k])
    assert any(".indexer." in k and not torch.equal(one[k], src[k]) for k in one)  # the indexers trained
    assert moved > len(one) // 2  # and the sparse stage's LM loss moved the rest


def test_overlap_tp2_matches_one_process(tmp_path):
    def run(name, *extra):
        out = tmp_path / f"{name}.json"
        assert main(["overlap", FIXTURE, "--num-seqs", "2", "--length", "96", "--device", "cpu", "--json", str(out),
                     *extra]) == 0
        return json.loads(out.read_text())

    one, two = run("tp1"), run("tp2", "-tp", "2", "--enable-expert-parallel")
    flat = [x for row in one["overlap"] for x in row]
    assert [x for row in two["overlap"] for x in row] == pytest.approx(flat, abs=1e-6)  # the same top-k sets
