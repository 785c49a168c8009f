"""The prefill glue (residual adds inside the norms, the absorbed query written in place, RoPE in place) against
the decode glue's maths: with the PyTorch references (the CPU engine) and with the Triton norm and RoPE kernels
(interpreter on CPU, fp32; bf16 on the GPU)."""
import pytest
import torch

from indexcache.engine.glue import GLUE, prefill_glue

from .helpers import greedy, make_engine, reference_greedy, run, tiny_model


@pytest.fixture(scope="module")
def model():
    return tiny_model(4)


def _layer_inputs(model, eng, t, seed):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(t, model.config.hidden_size, generator=g)
    pending = torch.randn(t, model.config.hidden_size, generator=g)
    cos, sin = model.rope(torch.arange(t)[None] * 7, h.dtype)
    return h, pending, cos, sin


@pytest.mark.parametrize("fused", [False, True], ids=["reference", "kernels"])
@pytest.mark.parametrize("layer", [0, 1])  # dense MLP, MoE; both run their indexer under the default pattern
def test_prefill_glue_equals_decode_glue(model, fused, layer):
    eng = make_engine(model)
    r = eng.runner
    lay, attn = model.layers[layer], model.layers[layer].self_attn
    w_uk, w_uv = r._absorbed[layer]
    h, pending, cos, sin = _layer_inputs(model, eng, 19, layer)
    tol = dict(atol=1e-5, rtol=1e-5)
    fn = prefill_glue(fused)
    with torch.inference_mode():
        want = GLUE["pre"](lay, h + pending, cos, sin, w_uk, *r._x_proj[layer])
        got = fn["pre"](lay, h, pending, cos[0], sin[0], w_uk, *r._x_proj[layer])
        torch.testing.assert_close(got[0], h + pending, atol=0, rtol=0)  # the stream: one rounding, as torch's add
        for a, b in zip(got[1:6], want[:5]):  # x, q, q_resid, c_kv, k_pe (the decode glue's q_resid is [1, T, .])
            torch.testing.assert_close(a, b.reshape(a.shape), **tol)
        assert (got[6] is None) == (want[5] is None)
        for a, b in zip(got[6] or (), want[5] or ()):  # the indexer's x-projections, when fused with q_a / kv_a
            torch.testing.assert_close(a, b.reshape(a.shape), **tol)
        for a, b in zip(fn["index_proj"](attn.indexer, *got[1:2], got[3], cos[0], sin[0], got[6]),
                        GLUE["index_proj"](attn.indexer, want[0], want[2], cos, sin, want[5])):
            torch.testing.assert_close(a, b, **tol)
        o_lat = torch.randn(19, attn.num_local_heads, model.config.kv_lora_rank,
                            generator=torch.Generator().manual_seed(1))
        a = fn["attn_out"](attn, o_lat, w_uv)
        torch.testing.assert_close(h + a, GLUE["attn_out"](attn, h, o_lat, w_uv), **tol)
        h2, mlp_out = fn["ffn"](lay, h, a, True)
        torch.testing.assert_close(h2 + mlp_out, GLUE["ffn"](lay, h + a, True), **tol)


@pytest.mark.parametrize("pattern", [None, "1/2"], ids=["full", "keep-1/2"])
def test_engine_with_prefill_kernels_equals_reference(model, pattern):
    # the CPU engine takes the references; here its prefill runs the Triton kernels (interpreter) instead
    p = torch.randint(0, 512, (45,), generator=torch.Generator().manual_seed(2)).tolist()
    eng = make_engine(model, pattern, max_prefill_tokens=24, max_num_seqs=2)
    eng.runner._prefill_fns = prefill_glue(fused=True)
    toks, logits = run(eng, [p], greedy(3))
    ref_toks, ref_logits = reference_greedy(model, p, 3, pattern=pattern)
    assert toks[0] == ref_toks
    torch.testing.assert_close(logits[0], ref_logits, atol=2e-4, rtol=1e-4)


@pytest.mark.gpu
def test_prefill_kernels_on_gpu_match_references_in_bf16():
    from indexcache.checkpoint import build_empty
    from indexcache.presets import preset_config

    cfg = preset_config("tiny").replace(index_n_heads=16, kv_lora_rank=512, qk_rope_head_dim=64, index_head_dim=128,
                                        index_topk=64)
    model = build_empty(cfg, "cuda", torch.bfloat16).init_random(5).eval()
    prompts = [torch.randint(0, 512, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (300, 77)]
    eng = make_engine(model, "1/2", num_kv_blocks=64, max_model_len=512, max_num_seqs=2, max_prefill_tokens=256)
    assert eng.runner._prefill_fns["pre"].keywords["fused"]  # CUDA prefill runs the kernels
    b = eng.runner.prepare([(p, 0, len(p), list(range(8 * i, 8 * i + 8))) for i, p in enumerate(prompts)])
    fused = eng.runner.forward(b).clone()
    eng.runner._prefill_fns = prefill_glue(fused=False)
    ref = eng.runner.forward(b).clone()
    assert torch.isfinite(fused).all()
    cos = torch.nn.functional.cosine_similarity(fused, ref, dim=-1)
    assert (cos > 0.999).all(), cos
    torch.testing.assert_close(fused, ref, atol=3e-2 * float(ref.abs().max()), rtol=3e-2)
