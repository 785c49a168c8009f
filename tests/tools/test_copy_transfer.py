"""benchmarks/copy_transfer.py on the committed fixture: copy reach per alphabet and dense vs own-top-k retrieval."""
import json

import pytest

from benchmarks.copy_transfer import ALPHABETS, main

FIXTURE = "tests/fixtures/stdlib-dsa-tiny"


def test_copy_transfer_on_the_fixture(capsys):
    assert main(["--checkpoint", FIXTURE, "--length", "256", "--windows", "1", "--items", "1",
                 "--retrieval-length", "256", "--tasks", "passkey,kv_single"]) == 0
    payload = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(payload["copy_reach"]) == set(ALPHABETS)
    assert all(0 < r["nll"] < 30 and r["chance"] > 2 for r in payload["copy_reach"].values())
    assert set(payload["retrieval"]) == {"passkey", "kv_single"}
    assert all(set(v) == {"dense", "own top-k"} and all(x in (0.0, 1.0) for x in v.values())
               for v in payload["retrieval"].values())


def test_copy_transfer_refuses_unknown_tasks():
    with pytest.raises(SystemExit):
        main(["--checkpoint", FIXTURE, "--tasks", "passkey,nope"])


def test_fact_prefix_item_repeats_the_facts_words():
    from benchmarks.copy_transfer import fact_prefix_item
    from indexcache.tools.corpus import load_corpus
    from indexcache.tools.tasks import HELDOUT_SEED_BASE, make_items

    test = load_corpus("test")
    item = make_items(test, ["kv_single"], 512, 1, HELDOUT_SEED_BASE, heldout=True)[0]
    alt = fact_prefix_item(item)
    text, new = bytes(item.prompt[1:]), bytes(alt.prompt[1:])
    fact = text[text.index(b"TABLE_"):].split(b"\n")[0]  # TABLE_x = {"key_y": V}
    assert fact == new[new.rindex(b"\n") + 1:] + item.answer + b"}"
    assert alt.answer == item.answer and new[:new.rindex(b"\n")] == text[:text.rindex(b"\n")]
    with pytest.raises(ValueError, match="passkey"):
        fact_prefix_item(make_items(test, ["passkey"], 512, 1, HELDOUT_SEED_BASE, heldout=True)[0])


def test_copy_transfer_fact_prefix_on_the_fixture(capsys):
    assert main(["--checkpoint", FIXTURE, "--length", "256", "--windows", "1", "--items", "0",
                 "--retrieval-length", "512", "--fact-prefix", "2"]) == 0
    payload = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(payload["fact_prefix"]) == {"suite query", "fact-prefix query"}
    assert all(x in (0.0, 0.5, 1.0) for x in payload["fact_prefix"].values())
