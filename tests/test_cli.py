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


FIXTURE = "tests/fixtures/stdlib-dsa-tiny"


def test_generate_defaults_follow_the_model_and_print_json_for_token_ids(capsys):
    # max_model_len defaults to the model's max_position_embeddings (the tiny preset: 4096, below the old 8192)
    assert main(["generate", "tiny", "1,2,3", "--token-ids", "--pattern", "1/2", "--max-tokens", "3"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("pattern FFSFSFSF")
    rec = json.loads(lines[1])
    assert rec["prompt"] is None and len(rec["token_ids"]) == 3 and rec["finish_reason"] == "length"
    assert main(["generate", "tiny", "1,2.5", "--token-ids"]) == 2
    assert "'2.5' is not an integer token id" in capsys.readouterr().err
    assert main(["generate", "tiny", "--max-model-len", "5000", "1,2", "--token-ids"]) == 2
    assert "max_position_embeddings (4096)" in capsys.readouterr().err


def test_generate_text_on_the_fixture(capsys):
    import os

    fixture = os.path.join(os.path.dirname(__file__), "fixtures", "stdlib-dsa-tiny")
    assert main(["generate", fixture, "def fib(n):\n", "--max-tokens", "4"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[1].startswith("def fib(n):") and out[-1].startswith("--- 4 tokens, finish length")
    assert main(["generate", fixture, "x", "--max-tokens", "2", "--json"]) == 0
    rec = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rec["prompt"] == "x" and isinstance(rec["text"], str) and len(rec["token_ids"]) == 2
    assert main(["generate", "tiny", "hello"]) == 2
    assert "no tokenizer" in capsys.readouterr().err


def test_engine_imports_no_cli_or_benchmarks():
    import os
    import re

    root = os.path.join(os.path.dirname(os.path.dirname(__file__)), "indexcache", "engine")
    for name in os.listdir(root):
        if name.endswith(".py"):
            src = open(os.path.join(root, name)).read()
            assert not re.search(r"^\s*(from|import)\s+(\.\.(cli|llm)|benchmarks|indexcache\.cli)", src, re.M), name
    assert not os.path.exists(os.path.join(root, "cli.py"))
