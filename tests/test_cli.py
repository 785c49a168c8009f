import json

from indexcache.cli import main


def test_demo_runs_and_reports(tmp_path, capsys):
    out = tmp_path / "demo.json"
    assert main(["demo", "--seq-len", "96", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "top-k overlap" in text and "keep 1/4" in text
    res = json.loads(out.read_text())
    specs = {p["spec"]: p for p in res["patterns"]}
    assert specs["all"]["logit_rel_diff"] == 0.0 and specs["all"]["num_full"] == 8
    assert specs["1/4"]["num_full"] == 3 and specs["1/4"]["indexer_bytes_saved"] > specs["1/2"]["indexer_bytes_saved"]
    assert specs["1/2"]["logit_rel_diff"] > 0


def test_info_and_errors(capsys):
    assert main(["info", "glm-4.7-flash-dsa", "--pattern", "1/4"]) == 0
    text = capsys.readouterr().out
    assert "13 of 47 layers" in text and "--json-model-override-args" in text
    assert main(["info", "glm-5", "--pattern", "FSX"]) == 2
    assert "may only contain" in capsys.readouterr().err
    assert main(["info", "nope"]) == 2
