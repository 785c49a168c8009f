"""The retrieval testbed's CPU smoke mode (benchmarks/retrieval_testbed.py): a piece that stops at its budget,
resumption to the end, the table, and the argument checks."""
import json
import os

import pytest

import torch

from benchmarks.retrieval_testbed import fr_pattern, main, update_docs
from indexcache.checkpoint import build_empty
from indexcache.tools.corpus import load_corpus
from indexcache.tools.train import TrainConfig
from tests.tools.stage_resume import assert_resume_equals_uninterrupted


def test_fr_pattern_at_equal_cost():
    p = fr_pattern(16, 5 / 16, 8192, 512)  # keep 1/4 of 16 layers = 5 F; R costs 1/16 of an F at 8K
    assert str(p) == "FRRRFRRRFRRRFRRR" and p.pool == 512
    assert p.indexer_cost(8192, 512) <= 5 / 16 < fr_pattern(16, 6 / 16, 8192, 512).indexer_cost(8192, 512)


def test_smoke_runs_in_pieces_and_resumes(tmp_path, capsys):  # ~25 s on an idle 2-core machine
    work = str(tmp_path / "tb")
    with pytest.raises(SystemExit, match="must be in"):
        main(["--smoke", "--work-dir", work, "--budget", "601"])
    # a budget too short for anything: the piece stops itself, keeps its state and says so
    assert main(["--smoke", "--work-dir", work, "--budget", "1", "--device", "cpu"]) == 3
    with pytest.raises(SystemExit, match="pass --resume"):
        main(["--smoke", "--work-dir", work, "--budget", "60"])
    state = json.load(open(os.path.join(work, "state.json")))
    assert state["train"]["stage"] == 0 and state["train_config"]["dense_steps"] == 2 and not state["done"]
    assert state["train_config"]["copy_steps"] == 2  # stage 0 is the copy warm-up
    docs = tmp_path / "q.md"
    docs.write_text("# page\n")
    for _ in range(5):
        if main(["--smoke", "--work-dir", work, "--budget", "600", "--device", "cpu", "--resume",
                 "--update-docs", "--docs", str(docs)]) == 0:
            break
    state = json.load(open(os.path.join(work, "state.json")))
    assert [(x["stage"], x["steps_done"]) for x in state["train"]["logs"] if x["steps_done"]][:2] == \
        [("copy", 2), ("dense", 2)]
    rows = [k for k in state["done"] if k.startswith("row: ")]
    assert rows[0] == "row: full DSA" and "row: F/R at the cost of 1/2" in rows and len(rows) == 8
    assert state["done"]["row: greedy F/R at the cost of 1/2"]["num_rerank"] == 2  # the search went down to 2 F
    # the S-or-R search: each step made a layer S or R, down to the F/R row's 2 F layers, each pick the lowest loss
    steps = state["done"]["search F/S/R"]["steps"]
    assert len(steps) == 2 and all(x["type"] in ("S", "R") for x in steps)
    assert all(x["loss"] == min(x["candidate_losses"].values()) for x in steps)
    searched = state["done"]["row: searched F/S/R at the cost of 1/2"]
    assert searched["num_full"] == 2 and searched["pattern"] == steps[-1]["pattern"]
    fr = state["done"]["row: F/R at the cost of 1/2"]
    assert fr["num_rerank"] > 0 and fr["indexer_cost"] < 1
    table = open(os.path.join(work, "testbed_table.md")).read()
    assert "| full DSA | `FFFF` | 4 | 0 | 1.000 |" in table and "testbed complete" in capsys.readouterr().out
    assert table in docs.read_text()
    update_docs(str(docs), "new\n")  # the block is replaced, not appended again
    assert docs.read_text().count("retrieval-testbed:start") == 1 and "new" in docs.read_text()


def test_run_stage_resumed_equals_uninterrupted():
    tc = TrainConfig(layers=2, hidden=32, heads=2, q_lora=32, kv_lora=32, nope=16, rope=16, v=16, mlp=64,
                     index_heads=2, index_dim=16, topk=16, context=64, batch=2, task_ratio=0.0,
                     contexts=(48, 64))
    corpus = load_corpus("train", max_bytes=200_000)

    def fresh():
        return build_empty(tc.model_config(), "cpu", torch.float32).init_random(0)

    # interrupted after 2 of 4 steps, resumed in a fresh model
    assert_resume_equals_uninterrupted("dense", tc, fresh, corpus)
