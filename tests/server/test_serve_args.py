"""``indexcache serve`` takes every engine option LLM takes, and passes only the ones given."""
import dataclasses

import pytest

from indexcache.cli import build_parser
from indexcache.engine.config import EngineConfig
from indexcache.server.cli import engine_options


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


def test_bad_flag_value_is_refused(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "tiny", "--max-num-seqs", "many"])
    assert "max-num-seqs" in capsys.readouterr().err
