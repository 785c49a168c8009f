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
