"""The engine on FP8 weights (reference GEMMs on CPU) against the same FP8 model's own forward, with q_a/kv_a
fused into one FP8 GEMM (q_lora a multiple of 128) and kept apart (the tiny preset's q_lora 64)."""
import pytest
import torch

from indexcache.checkpoint import build_empty
from indexcache.model.linear import Fp8Linear, use_fp8_storage
from indexcache.presets import preset_config

from .helpers import greedy, make_engine, reference_greedy, run


def _fp8_tiny(q_lora):
    cfg = preset_config("tiny").replace(index_n_heads=16, q_lora_rank=q_lora, num_layers=4)
    model = build_empty(cfg, "cpu", torch.float32).init_random(5).eval()
    use_fp8_storage(model, quantize=True)
    return model


@pytest.mark.parametrize("q_lora", [128, 64], ids=["fused", "apart"])
def test_fp8_engine_equals_reference(q_lora):
    model = _fp8_tiny(q_lora)
    p = torch.randint(0, 512, (50,), generator=torch.Generator().manual_seed(1)).tolist()
    eng = make_engine(model, "1/2", max_prefill_tokens=24)
    fused = eng.runner._x_proj[0][0]
    assert isinstance(fused, Fp8Linear) == (q_lora == 128)
    toks, logits = run(eng, [p], greedy(4))
    ref_toks, ref_logits = reference_greedy(model, p, 4, pattern="1/2")
    assert toks[0] == ref_toks
    # looser than the fp32 engine test (2e-4): an fp32 rounding difference between the flat-batch and batched
    # forms can move an activation across an e4m3 rounding boundary (one code step = 2^-3 relative)
    torch.testing.assert_close(logits[0], ref_logits, atol=2e-3, rtol=1e-3)


def test_fp8_compiled_decode_equals_eager():
    # aot_eager traces the glue as inductor would: the FP8 linear layers (reference GEMM on CPU) compile
    model = _fp8_tiny(128)
    prompts = [torch.randint(0, 512, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (40, 23)]
    ref = run(make_engine(model, "1/2"), prompts, greedy(4))
    out = run(make_engine(model, "1/2", compile_decode=True, compile_backend="aot_eager"), prompts, greedy(4))
    assert out[0] == ref[0]
    for a, b in zip(out[1], ref[1]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
def test_fp8_engine_on_gpu_graphs_and_compile_equal_eager():
    """glm-4.7-flash-dsa dimensions (3 layers) in FP8 on the GPU: scaled_mm linears, the FP8 decode expert kernel
    (batch 1-2) and grouped FP8 GEMM (prefill) under CUDA graphs + inductor, against eager; and FP8 against the
    same weights dequantised to bf16 (a loose bound: random weights, bf16 rounding, activation quantisation)."""
    import copy

    from indexcache.model.linear import use_dequantized_storage

    cfg = preset_config("glm-4.7-flash-dsa").replace(num_layers=3)
    model = build_empty(cfg, "cuda", torch.bfloat16).init_random(0).eval()
    use_fp8_storage(model, quantize=True)
    bf = copy.deepcopy(model)
    use_dequantized_storage(bf, torch.bfloat16)
    prompts = [torch.randint(0, cfg.vocab_size, (n,), generator=torch.Generator().manual_seed(n)).tolist()
               for n in (300, 120)]
    eager = run(make_engine(model, None, max_model_len=1024, enforce_eager=True), prompts, greedy(8))
    fast = run(make_engine(model, None, max_model_len=1024), prompts, greedy(8))
    ref = run(make_engine(bf, None, max_model_len=1024, enforce_eager=True), prompts, greedy(8))
    def same_prefix(x, y):  # steps up to and including the first differing token see the same context
        return next((i for i, (u, v) in enumerate(zip(x, y)) if u != v), len(x) - 1) + 1

    for i in range(len(prompts)):
        n = same_prefix(fast[0][i], eager[0][i])
        a, b = fast[1][i][:n], eager[1][i][:n]
        assert float((a - b).norm() / b.norm()) < 2e-2  # bf16 glue compiled vs eager
        n = same_prefix(eager[0][i], ref[0][i])
        b, c = eager[1][i][:n], ref[1][i][:n]
        assert float((b - c).norm() / c.norm()) < 0.15  # FP8 compute vs the dequantised weights in bf16
