"""Bad input gets an error that names the field, key or file and the bad value (never a default or a traceback)."""
import json
import math
import os
import shutil

import pytest

from indexcache.checkpoint import CheckpointError, inspect_safetensors, load_model
from indexcache.cli import main
from indexcache.config import ConfigError, ModelConfig
from indexcache.presets import preset_hf_dict
from indexcache.sampling import SamplingParams

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "stdlib-dsa-tiny")


@pytest.mark.parametrize("kwargs, message", [
    (dict(temperature=float("nan")), "temperature must be finite, got nan"),
    (dict(temperature=math.inf), "temperature must be finite, got inf"),
    (dict(temperature="hot"), "temperature must be a number, got 'hot'"),
    (dict(temperature=None), "temperature must be a number, got None"),
    (dict(temperature=-0.5), "temperature must be >= 0"),
    (dict(top_p=float("nan")), "top_p must be finite, got nan"),
    (dict(top_p="0.9"), "top_p must be a number, got '0.9'"),
    (dict(top_p=0.0), r"top_p must be in \(0, 1\], got 0.0"),
    (dict(top_k=1.7), "top_k must be an integer .*got 1.7"),
    (dict(top_k=True), "top_k must be an integer .*got True"),
    (dict(max_tokens=2.0), "max_tokens must be an integer, got 2.0"),
    (dict(max_tokens=0), "max_tokens must be an integer >= 1, got 0"),
    (dict(seed=1.5), "seed must be an integer, got 1.5"),
    (dict(stop_token_ids=[1.7]), "stop_token_ids entry must be an integer, got 1.7"),
    (dict(stop=[2.5]), "stop entries must be strings or token ids .*got 2.5"),
    (dict(ignore_eos="yes"), "ignore_eos must be True or False, got 'yes'"),
])
def test_sampling_params_reject_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def test_sampling_params_accept_good_values():
    import numpy as np

    p = SamplingParams(max_tokens=np.int64(3), temperature=0, top_p=np.float32(0.5), top_k=4, seed=7,
                       stop=["x", 5], stop_token_ids=[9])
    assert p.stop_strings == ["x"] and p.stop_token_ids == [9, 5] and p.greedy


def _config_without(tmp_path, *keys, **changes):
    d = dict(preset_hf_dict("tiny"), **changes)
    for k in keys:
        d.pop(k)
    path = tmp_path / "ckpt"
    path.mkdir(exist_ok=True)
    (path / "config.json").write_text(json.dumps(d))
    return str(path)


def test_config_missing_required_keys_listed_together(tmp_path, capsys):
    path = _config_without(tmp_path, "hidden_size", "vocab_size", "index_topk")
    with pytest.raises(ConfigError, match="missing required keys vocab_size, hidden_size, index_topk") as e:
        ModelConfig.from_checkpoint(path)
    assert "config.json" in str(e.value) and path in str(e.value)
    assert main(["info", path]) == 2  # info never describes a model with guessed dimensions
    assert "hidden_size" in capsys.readouterr().err
    # MoE keys are required only when some layer is MoE
    dense = _config_without(tmp_path, "n_routed_experts", first_k_dense_replace=8)
    assert ModelConfig.from_checkpoint(dense).num_layers == 8
    moe = _config_without(tmp_path, "n_routed_experts", first_k_dense_replace=1)
    with pytest.raises(ConfigError, match="missing required key n_routed_experts"):
        ModelConfig.from_checkpoint(moe)


@pytest.mark.parametrize("key, value, message", [
    ("hidden_size", "128", "hidden_size must be an integer, got '128'"),
    ("num_hidden_layers", 8.5, "num_hidden_layers must be an integer, got 8.5"),
    ("rms_norm_eps", float("nan"), "rms_norm_eps must be a finite number, got nan"),
])
def test_config_bad_values_named(tmp_path, key, value, message):
    path = _config_without(tmp_path, **{key: value})
    with pytest.raises(ConfigError, match=message):
        ModelConfig.from_checkpoint(path)


@pytest.fixture(scope="module")
def fixture_bytes():
    with open(os.path.join(FIXTURE, "model.safetensors"), "rb") as f:
        return f.read()


@pytest.mark.parametrize("cut, message", [
    (lambda b: b[:-1000], r"truncated: the header describes .* \(1,000 missing"),
    (lambda b: b[:4], "not a safetensors file: 4 bytes"),
    (lambda b: b[:5000], "the header claims .* bytes but the file holds"),
    (lambda b: b"x" * 300, "the header claims"),
    (lambda b: b[:8] + b"{oops" + b[13:], "header is not valid JSON"),
    (lambda b: b + b"tail", "4 bytes after the last tensor"),
])
def test_corrupt_safetensors_named_by_load_and_info(tmp_path, fixture_bytes, cut, message, capsys):
    path = tmp_path / "ckpt"
    path.mkdir()
    shutil.copy(os.path.join(FIXTURE, "config.json"), path / "config.json")
    bad = path / "model.safetensors"
    bad.write_bytes(cut(fixture_bytes))
    with pytest.raises(CheckpointError, match=message) as e:
        load_model(str(path))
    assert str(bad) in str(e.value)
    assert main(["info", str(path)]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and len(err) < 400


def test_intact_safetensors_header(fixture_bytes):
    info = inspect_safetensors(os.path.join(FIXTURE, "model.safetensors"))
    assert info["tensors"] > 100 and 0 < info["bytes"] < len(fixture_bytes)


def test_saved_checkpoint_files_follow_the_umask(tmp_path):
    from indexcache.checkpoint import save_checkpoint

    model = load_model("tiny")
    old = os.umask(0o027)
    try:
        files = save_checkpoint(model, str(tmp_path / "out"))
    finally:
        os.umask(old)
    for f in files + [str(tmp_path / "out" / "config.json")]:
        assert os.stat(f).st_mode & 0o777 == 0o640, f
