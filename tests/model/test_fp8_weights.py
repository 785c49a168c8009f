"""FP8 weights kept in FP8: a DeepSeek-V3.2-style FP8 checkpoint (128x128 weight_scale_inv, as transformers'
fine-grained FP8 format and the released checkpoints) loads with weight_dtype="fp8" (the reference GEMM on CPU)
and its logits stay within a stated bound of the same checkpoint dequantised; presets build in FP8; errors."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import indexcache
from indexcache.checkpoint import CheckpointError, hf_state_dict, load_model, quantize_fp8_blocks, save_checkpoint
from indexcache.model.linear import Fp8Linear, is_fp8_model, weight_bytes

from .hf_reference import hf_model, rel_err

pytest.importorskip("transformers")

# Bounds on the relative logit error of FP8 compute against the same weights dequantised: the only difference is
# the 1x128 e4m3 quantisation of every FP8 layer's input (~2.6% rms per GEMM: 3 mantissa bits). Measured on the
# 5-layer deepseek_v32 model: 0.048 at 7 tokens (top-k = 7 selects every key: quantisation alone) and 0.13 at 29
# tokens (a few top-k choices and expert routes flip). Random tiny models amplify it; the GPU benchmark measures
# realistic dimensions.
FP8_VS_DEQUANT = {7: 0.08, 29: 0.2}
_KEEP_BF16 = ("embed_tokens", "lm_head", "mlp.gate.weight", "weights_proj", "norm")


def _fp8_checkpoint(tmp_path, family="deepseek_v32", seed=0, **overrides):
    """transformers' random model -> our loader -> per-expert HF names -> FP8 the way DeepSeek ships it."""
    hf = hf_model(family, seed, **overrides)
    hf.save_pretrained(tmp_path / "hf")
    model = load_model(str(tmp_path / "hf"))
    path = tmp_path / "fp8"
    save_checkpoint(model, path)
    tensors = load_file(path / "model.safetensors")
    for k in list(tensors):
        t = tensors[k]
        if t.dim() == 2 and not any(s in k for s in _KEEP_BF16):
            tensors[k], tensors[k + "_scale_inv"] = quantize_fp8_blocks(t)
    save_file(tensors, path / "model.safetensors")
    cfg = json.loads((path / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3",
                                  "weight_block_size": [128, 128]}
    (path / "config.json").write_text(json.dumps(cfg))
    return path, tensors, hf.config.vocab_size


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """family -> (path, tensors, vocab) of one FP8 checkpoint per family, made once for the module."""
    made = {}

    def get(family):
        if family not in made:
            made[family] = _fp8_checkpoint(tmp_path_factory.mktemp(family), family)
        return made[family]
    return get


def _logits(model, vocab, seed=0, n=29):
    ids = torch.randint(0, vocab, (2, n), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("family", ["deepseek_v32", "glm_moe_dsa"])
def test_fp8_checkpoint_stays_fp8_and_matches_dequantised(ckpt, family):
    path, tensors, vocab = ckpt(family)
    fp8 = load_model(str(path), weight_dtype="fp8")
    deq = load_model(str(path), weight_dtype="bf16")  # on CPU "auto" dequantises too
    assert not is_fp8_model(load_model(str(path)))
    attn = fp8.layers[1].self_attn
    assert isinstance(attn.q_a_proj, Fp8Linear) and isinstance(attn.o_proj, Fp8Linear)
    assert not isinstance(attn.kv_b_proj, Fp8Linear) and attn.kv_b_proj.weight.dtype == torch.float32
    assert fp8.layers[1].mlp.experts.gate_up.dtype == torch.float8_e4m3fn
    # the checkpoint's FP8 bytes and scales are kept exactly (saved back under the same names)
    sd = hf_state_dict(fp8)
    for k in ("model.layers.1.self_attn.q_a_proj.weight", "model.layers.1.mlp.experts.3.up_proj.weight",
              "model.layers.2.mlp.experts.0.down_proj.weight_scale_inv", "model.layers.0.mlp.gate_proj.weight"):
        assert torch.equal(sd[k].view(torch.uint8) if sd[k].dtype == torch.float8_e4m3fn else sd[k],
                           tensors[k].view(torch.uint8) if tensors[k].dtype == torch.float8_e4m3fn else tensors[k]), k
    for n, bound in FP8_VS_DEQUANT.items():
        err = rel_err(_logits(fp8, vocab, n=n), _logits(deq, vocab, n=n))
        assert 0 < err < bound, (n, err)
    assert weight_bytes(fp8) < weight_bytes(deq)


def test_fp8_model_saves_and_reloads_identically(tmp_path, ckpt):
    path, _, vocab = ckpt("deepseek_v32")
    fp8 = load_model(str(path), weight_dtype="fp8")
    save_checkpoint(fp8, tmp_path / "again")
    again = load_model(str(tmp_path / "again"), weight_dtype="fp8")
    assert torch.equal(_logits(fp8, vocab), _logits(again, vocab))


def test_bf16_checkpoint_quantised_on_load_equals_fp8_preset(tmp_path):
    bf = load_model("tiny", seed=4)
    save_checkpoint(bf, tmp_path)
    from_ckpt = load_model(str(tmp_path), weight_dtype="fp8")
    preset = load_model("tiny", seed=4, weight_dtype="fp8")
    assert is_fp8_model(preset) and is_fp8_model(from_ckpt)
    ids_logits = _logits(preset, 512, n=12)
    assert torch.equal(_logits(from_ckpt, 512, n=12), ids_logits)
    err = rel_err(ids_logits, _logits(bf, 512, n=12))  # weights AND activations quantised, 8 random layers
    assert 0 < err < 0.2, err


def test_fp8_checkpoint_errors_listed_together(tmp_path, ckpt):
    import shutil

    src, tensors, _ = ckpt("deepseek_v32")
    path = tmp_path / "broken"
    shutil.copytree(src, path)
    tensors = dict(tensors)
    tensors["model.layers.1.self_attn.o_proj.weight_scale_inv"] = torch.ones(3, 3)
    tensors["model.layers.2.mlp.experts.1.gate_proj.weight_scale_inv"] = torch.ones(2, 1)
    del tensors["model.layers.3.self_attn.q_b_proj.weight"]  # its scale is left behind: unexpected
    del tensors["model.layers.1.self_attn.q_a_proj.weight_scale_inv"]  # FP8 codes without their scales
    save_file(tensors, path / "model.safetensors")
    for wd in ("fp8", "bf16"):
        with pytest.raises(CheckpointError) as e:
            load_model(str(path), weight_dtype=wd)
        msg = str(e.value)
        assert "o_proj.weight_scale_inv: checkpoint (3, 3)" in msg
        assert "experts.1.gate_proj.weight_scale_inv: checkpoint (2, 1)" in msg
        assert "layers.3.self_attn.q_b_proj.weight" in msg and "1 missing" in msg
        assert "q_b_proj.weight_scale_inv" in msg and "1 unexpected" in msg
        assert "layers.1.self_attn.q_a_proj.weight: a float8 weight without" in msg


def test_weight_dtype_is_checked():
    with pytest.raises(ValueError, match="weight_dtype must be one of"):
        indexcache.load_model("tiny", weight_dtype="int8")


@pytest.mark.parametrize("weight_dtype", ["bf16", "fp8"])
def test_weight_bytes_from_config_equal_the_built_model(weight_dtype):
    from indexcache.model.weight_sizes import weight_bytes_per_gpu

    model = load_model("tiny", dtype=torch.bfloat16, weight_dtype=weight_dtype, index_pattern="1/2")
    held = sum(t.numel() * t.element_size() for n, t in list(model.named_parameters()) + list(model.named_buffers())
               if not n.startswith("rotary."))
    assert weight_bytes_per_gpu(model.config, weight_dtype == "fp8")["total"] == held
    tp8 = weight_bytes_per_gpu(model.config, weight_dtype == "fp8", tp=8)
    assert tp8["per_gpu"] == tp8["split"] // 8 + tp8["replicated"] and tp8["total"] == held


def test_info_shows_fp8_fits_eight_h200s(capsys):
    from indexcache.cli import main

    assert main(["info", "deepseek-v3.2", "--tp", "8"]) == 0
    out = capsys.readouterr().out
    assert "bf16 weights" in out and "does NOT fit" in out.split("bf16 weights")[1].split("\n")[0]
    assert "fits: " in out.split("fp8 weights")[1].split("\n")[0]
    assert main(["info", "glm-5", "--tp", "8", "--weight-dtype", "fp8"]) == 0
    out = capsys.readouterr().out
    assert "fp8 weights" in out and "bf16 weights" not in out


def test_dequantized_storage_is_the_bf16_load(ckpt):
    from indexcache.model.linear import use_dequantized_storage

    path, _, vocab = ckpt("glm_moe_dsa")
    fp8 = load_model(str(path), weight_dtype="fp8")
    use_dequantized_storage(fp8, torch.float32)
    assert not is_fp8_model(fp8) and fp8.layers[1].mlp.experts.gate_up.dtype == torch.float32
    assert torch.equal(_logits(fp8, vocab, n=9), _logits(load_model(str(path), weight_dtype="bf16"), vocab, n=9))
