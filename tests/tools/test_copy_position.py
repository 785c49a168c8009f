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
