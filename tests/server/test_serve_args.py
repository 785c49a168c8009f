"""``indexcache serve`` takes every engine option LLM takes, and passes only the ones given."""
import dataclasses

import pytest

from indexcache.cli import build_parser
from indexcache.engine.config import EngineConfig
from indexcache.server.cli import engine_options, llm_keywords


def test_every_engine_option_is_a_flag():
    args = build_parser().parse_args(["serve", "tiny"])
    assert args.host == "127.0.0.1" and args.port == 8000
    assert engine_options(args) == {}  # nothing given: LLM's and EngineConfig's defaults apply
    argv = ["serve", "tiny"]
    for f in dataclasses.fields(EngineConfig):
        flag = "--" + f.name.replace("_", "-")
        typ = str(f.type)
        if typ.startswith("bool"):
            argv.append(("--no-" + flag[2:]) if f.default else flag)
        else:
            argv += [flag, "7" if typ.startswith(("int", "float")) else "x"]
    given = engine_options(build_parser().parse_args(argv))
    assert set(given) == {f.name for f in dataclasses.fields(EngineConfig)}
    assert given["enable_prefix_caching"] is False and given["max_model_len"] == 7


def test_llm_keyword_options_become_flags(monkeypatch):
    """Options LLM takes beside EngineConfig's (a weight format, a parallel size) are flags without a code change."""
    import argparse

    from indexcache.server import cli

    class StubLLM:
        def __init__(self, model, index_pattern=None, *, device=None, dtype=None, seed=0, tokenizer=None,
                     weight_dtype="auto", shards=1, fused=False, **engine_options):
            pass

    monkeypatch.setattr(cli, "LLM", StubLLM)
    assert set(llm_keywords()) == {"weight_dtype", "shards", "fused"}
    p = argparse.ArgumentParser()
    cli.add_llm_arguments(p)
    assert engine_options(p.parse_args([])) == {}
    got = engine_options(p.parse_args(["--weight-dtype", "fp8", "--shards", "2", "--fused"]))
    assert got == {"weight_dtype": "fp8", "shards": 2, "fused": True}


def test_bad_flag_value_is_refused(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "tiny", "--max-num-seqs", "many"])
    assert "max-num-seqs" in capsys.readouterr().err
