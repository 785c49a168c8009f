"""benchmarks/copy_position.py's long phase on a tiny model: a length curriculum, log-uniform copy distances and
mixed-in short windows run as run_stage draws them, the whole copy stage with --long-share, evaluations at
--eval-steps, and the previous-token heads' layer reported."""
import json

import pytest

from benchmarks.copy_position import main

TINY = ["--layers", "2", "--width", "32", "--heads", "2", "--batch", "1", "--eval-lengths", "64,128", "--windows", "1"]


def _payload(out: str) -> dict:
    return json.loads(next(line for line in out.splitlines() if line.startswith('{"meta"')))


def test_long_phase_curriculum_whole_stage(capsys):
    assert main(TINY + ["--data", "long-phase", "--length", "128,256", "--long-share", "0.5", "--gaps", "log",
                        "--mix", "0.25", "--steps", "4", "--eval-steps", "2"]) == 0
    res = _payload(capsys.readouterr().out)
    assert [r["label"].split(" (")[0] for r in res["results"]] == ["step 2", "step 4"]
    last = res["results"][-1]
    assert set(last["table"]) == {"64", "128"} and all(0 < a < 10 and 0 < b < 10 for a, b in last["table"].values())
    assert last["prev_layer"] in (0, 1) and len(last["heads"]) == 2 and "analysis" in last
    assert res["args"]["length"] == [128, 256] and res["args"]["gaps"] == "log"


def test_several_lengths_only_for_the_long_phase():
    with pytest.raises(SystemExit):
        main(TINY + ["--data", "stage", "--length", "64,128", "--steps", "1"])


def test_distance_eval_save_and_continued_optimizer(tmp_path, capsys):
    """--save writes the model and its optimizer (SAVE.opt); --init/--init-opt continue both; --eval-distances
    bins every copy of the long phase's held-out windows by its distance (12-31, then powers of two)."""
    import torch

    from indexcache.tools.tasks import copy_episode_spans

    save = str(tmp_path / "m.pt")
    assert main(TINY + ["--data", "stage", "--length", "64", "--steps", "2", "--save", save]) == 0
    assert torch.load(save + ".opt")["state"]  # AdamW moments, not an empty state
    capsys.readouterr()
    assert main(TINY + ["--data", "long-phase", "--length", "128", "--steps", "1", "--init", save,
                        "--init-opt", save + ".opt", "--warm", "0", "--eval-distances", "256"]) == 0
    bins = _payload(capsys.readouterr().out)["results"][-1]["by_distance"]["256"]
    spans = copy_episode_spans(257, 1 << 42, 64, 232, gaps="log")[1]  # the one held-out window (--windows 1)
    want = {}
    for src, dst, _ in spans:
        b = 12 if dst - src < 32 else 1 << ((dst - src).bit_length() - 1)
        want[str(b)] = want.get(str(b), 0) + 1
    assert {b: c for b, (_, c) in bins.items()} == want and len(want) >= 2
    assert all(0 < nll < 10 for nll, _ in bins.values())
