"""The quality tools with ``-tp 2`` (two gloo ranks) report what they report on one process."""
import json
import os

import pytest

from indexcache.tools.cli import main

FIXTURE = os.path.join(os.path.dirname(__file__), "..", "fixtures", "stdlib-dsa-tiny")


def _eval(tmp_path, name, *extra):
    out = tmp_path / f"{name}.json"
    assert main(["eval", FIXTURE, "--patterns", "model", "1/2", "--context", "96", "--lengths", "96",
                 "--n-retrieval", "2", "--windows", "2", "--batch", "2", "--device", "cpu", "--json", str(out),
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


def test_distill_refuses_tensor_parallel_clearly(tmp_path, capsys):
    assert main(["distill", FIXTURE, "--pattern", "1/2", "--out", str(tmp_path / "d"), "--device", "cpu",
                 "-tp", "2"]) == 2
    assert "distill does not run tensor-parallel" in capsys.readouterr().err


def test_overlap_tp2_matches_one_process(tmp_path):
    def run(name, *extra):
        out = tmp_path / f"{name}.json"
        assert main(["overlap", FIXTURE, "--num-seqs", "2", "--length", "96", "--device", "cpu", "--json", str(out),
                     *extra]) == 0
        return json.loads(out.read_text())

    one, two = run("tp1"), run("tp2", "-tp", "2", "--enable-expert-parallel")
    flat = [x for row in one["overlap"] for x in row]
    assert [x for row in two["overlap"] for x in row] == pytest.approx(flat, abs=1e-6)  # the same top-k sets
