"""Checkpoint loading: FP8 block dequantisation, sharding, name mapping and the one clear error."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

import indexcache
from indexcache.checkpoint import (CheckpointError, dequantize_fp8_blocks, hf_state_dict, quantize_fp8_blocks,
                                   save_checkpoint)
from indexcache.config import ConfigError


def _tiny(pattern=None, seed=0):
    return indexcache.load_model("tiny", index_pattern=pattern, seed=seed)


def _logits(model, seed=0):
    ids = torch.randint(0, model.config.vocab_size, (1, 40), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(ids).logits


def test_fp8_block_round_trip():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(300, 200, generator=g) * torch.logspace(-2, 1, 200)  # ragged blocks, varied magnitudes
    q, scale_inv = quantize_fp8_blocks(w)
    assert q.dtype == torch.float8_e4m3fn and scale_inv.shape == (3, 2)
    back = dequantize_fp8_blocks(q, scale_inv)
    assert back.shape == w.shape
    err = float((back - w).norm() / w.norm())
    assert err < 0.04, err  # e4m3 has 3 mantissa bits
    # block (i, j) uses its own scale: scaling one scale scales only that block
    scale2 = scale_inv.clone()
    scale2[1, 0] *= 2
    back2 = dequantize_fp8_blocks(q, scale2)
    assert torch.allclose(back2[128:256, :128], 2 * back[128:256, :128])
    assert torch.equal(back2[:128], back[:128]) and torch.equal(back2[256:], back[256:])
    with pytest.raises(CheckpointError, match=r"weight_scale_inv shape \(2, 2\)"):
        dequantize_fp8_blocks(q, scale_inv[:2])


def test_fp8_checkpoint_loads_dequantised(tmp_path):
    model = _tiny()
    save_checkpoint(model, tmp_path)
    path = tmp_path / "model.safetensors"
    tensors = load_file(path)
    expected = {}
    for k in list(tensors):
        t = tensors[k]
        if t.dim() == 2 and "embed" not in k and "lm_head" not in k and "weights_proj" not in k:
            q, s = quantize_fp8_blocks(t)
            tensors[k], tensors[k + "_scale_inv"] = q, s
            expected[k] = dequantize_fp8_blocks(q, s)
    save_file(tensors, path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "weight_block_size": [128, 128], "fmt": "e4m3"}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    loaded = indexcache.load_model(str(tmp_path))
    sd = hf_state_dict(loaded)
    for k, v in expected.items():
        assert torch.equal(sd[k], v), k
    err = float((_logits(loaded) - _logits(model)).norm() / _logits(model).norm())
    assert 0 < err < 0.1


def test_sharded_checkpoint_equals_single_file(tmp_path):
    model = _tiny("1/2", seed=3)
    files = save_checkpoint(model, tmp_path / "sharded", max_shard_bytes=200_000)
    assert len(files) > 3 and os.path.isfile(tmp_path / "sharded" / "model.safetensors.index.json")
    loaded = indexcache.load_model(str(tmp_path / "sharded"))
    assert str(loaded.pattern) == str(model.pattern)
    assert torch.equal(_logits(loaded), _logits(model))


def test_shared_layers_skip_indexer_weights(tmp_path):
    full = _tiny(seed=1)
    save_checkpoint(full, tmp_path)
    from indexcache.checkpoint import load_weights, build_empty
    cfg = full.config.with_pattern("1/4")
    model = build_empty(cfg, "cpu", torch.float32)
    counts = load_weights(model, str(tmp_path))
    n_shared = len(cfg.pattern.shared_layers)
    assert counts["shared_indexer"] == 5 * n_shared  # wq_b, wk, k_norm.{weight,bias}, weights_proj
    assert sum(p.numel() for p in model.parameters()) < sum(p.numel() for p in full.parameters())
    assert model.indexer_bytes_saved() == n_shared * full.indexer_param_bytes_per_layer()


def test_mtp_layers_beyond_num_layers_are_skipped(tmp_path):
    model = _tiny()
    save_checkpoint(model, tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    tensors["model.layers.8.input_layernorm.weight"] = torch.ones(128)  # an MTP layer (index == num_layers)
    save_file(tensors, tmp_path / "model.safetensors")
    assert torch.equal(_logits(indexcache.load_model(str(tmp_path))), _logits(model))


def test_mismatches_give_one_error_listing_all(tmp_path):
    model = _tiny()
    save_checkpoint(model, tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["model.layers.2.self_attn.o_proj.weight"]
    del tensors["model.layers.3.mlp.experts.5.up_proj.weight"]
    tensors["model.layers.0.self_attn.surprise.weight"] = torch.ones(3)
    tensors["model.norm.weight"] = torch.ones(7)
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError) as e:
        indexcache.load_model(str(tmp_path))
    msg = str(e.value)
    assert "2 missing" in msg and "layers.2.self_attn.o_proj.weight" in msg
    assert "layers.3.mlp.experts.5.up_proj.weight" in msg
    assert "1 unexpected" in msg and "surprise" in msg
    assert "1 wrongly shaped" in msg and "norm.weight: checkpoint (7,) vs model (128,)" in msg


def test_transformers_packed_expert_layout_loads(tmp_path):
    model = _tiny(seed=2)
    save_checkpoint(model, tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    E = model.config.n_routed_experts
    for layer in range(1, model.config.num_layers):
        base = f"model.layers.{layer}.mlp.experts"
        gate_up = torch.stack([torch.cat([tensors.pop(f"{base}.{e}.gate_proj.weight"),
                                          tensors.pop(f"{base}.{e}.up_proj.weight")]) for e in range(E)])
        down = torch.stack([tensors.pop(f"{base}.{e}.down_proj.weight") for e in range(E)])
        tensors[f"{base}.gate_up_proj"], tensors[f"{base}.down_proj"] = gate_up, down
    save_file(tensors, tmp_path / "model.safetensors")
    assert torch.equal(_logits(indexcache.load_model(str(tmp_path))), _logits(model))


@pytest.mark.parametrize("change,match", [
    ({"model_type": "llama"}, "model_type 'llama' is not supported"),
    ({"num_hidden_layers": "many"}, "num_hidden_layers must be an integer"),
    ({"index_head_dim": 8}, "index_head_dim \\(8\\) must be >= qk_rope_head_dim \\(16\\)"),
    ({"n_group": 3}, "divisible by n_group"),
    ({"index_topk_pattern": "FSF"}, "has 3 letters but the model has 8 layers"),
    ({"quantization_config": {"quant_method": "awq"}}, "quant_method 'awq'"),
    ({"rope_parameters": {"rope_type": "longrope", "rope_theta": 1.0}}, "rope type 'longrope'"),
])
def test_bad_config_json_errors(tmp_path, change, match):
    save_checkpoint(_tiny(), tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg.update(change)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=match):
        indexcache.load_model(str(tmp_path))


def test_bad_path_or_preset_and_inputs(tmp_path):
    with pytest.raises(ConfigError, match="neither a checkpoint folder nor a preset"):
        indexcache.load_model("no-such-model")
    with pytest.raises(ConfigError, match="no config.json"):
        indexcache.ModelConfig.from_checkpoint(str(tmp_path))
    model = _tiny()
    with pytest.raises(ValueError, match="token id 512 is outside the vocabulary"):
        model(torch.tensor([[1, 512]]))
    with pytest.raises(ValueError, match="must be \\[batch, seq\\]"):
        model(torch.tensor([1, 2]))
    shared = _tiny("1/2")
    with pytest.raises(indexcache.PatternError, match="has no indexer weights"):
        shared(torch.tensor([[1, 2]]), pattern="F" * 8)
