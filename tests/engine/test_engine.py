"""The engine against the reference model on the tiny preset (fp32, random weights)."""
import pytest
import torch

from indexcache.engine import OutOfBlocks
from indexcache.pattern import PatternError

from .helpers import tiny_model, greedy, make_engine, reference_greedy, run


@pytest.fixture(scope="module")
def model():
    return tiny_model(3)


def prompt(n, seed):
    return torch.randint(0, 512, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("pattern", [None, "1/2", "FFSFSSFS"], ids=["full", "keep-1/2", "explicit"])
@pytest.mark.parametrize("chunk", [4096, 24], ids=["whole-prefill", "chunked"])
def test_greedy_equals_reference(model, pattern, chunk):
    p = prompt(70, 1)  # longer than top-k (32): the selection matters
    eng = make_engine(model, pattern, max_prefill_tokens=chunk)
    toks, logits = run(eng, [p], greedy(6))
    ref_toks, ref_logits = reference_greedy(model, p, 6, pattern=pattern)
    assert toks[0] == ref_toks
    torch.testing.assert_close(logits[0], ref_logits, atol=2e-4, rtol=1e-4)
    assert eng.blocks.num_free == eng.blocks.num_blocks  # every page came back


def test_chunked_prefill_equals_unchunked(model):
    p = prompt(150, 2)
    _, whole = run(make_engine(model, "1/2"), [p], greedy(3))
    _, chunked = run(make_engine(model, "1/2", max_prefill_tokens=17), [p], greedy(3))
    torch.testing.assert_close(chunked[0], whole[0], atol=1e-4, rtol=1e-4)


def test_continuous_batching_equals_alone(model):
    prompts = [prompt(n, 10 + n) for n in (9, 70, 41, 100)]
    lens = [5, 3, 7, 4]
    params = [greedy(n) for n in lens]
    alone = [run(make_engine(model, "1/2"), [p], sp) for p, sp in zip(prompts, params)]
    eng = make_engine(model, "1/2", max_prefill_tokens=48, max_num_seqs=3)
    toks, logits = run(eng, prompts[:3], params[:3], join_after=(2, prompts[3:], params[3:]))
    for i in range(4):
        assert toks[i] == alone[i][0][0]
        torch.testing.assert_close(logits[i], alone[i][1][0], atol=1e-4, rtol=1e-4)


def test_small_cache_queues_and_preempts_without_corruption(model):
    prompts = [prompt(n, 20 + n) for n in (60, 66, 50)]
    params = greedy(20)
    alone = [run(make_engine(model), [p], params)[0][0] for p in prompts]
    eng = make_engine(model, num_kv_blocks=3, page_size=32)  # 96 tokens: one request at a time, others wait
    toks, _ = run(eng, prompts, params)
    assert toks == alone
    assert eng.blocks.num_free == 3


def test_out_of_blocks_is_refused(model):
    eng = make_engine(model, num_kv_blocks=2, page_size=16)
    with pytest.raises(OutOfBlocks, match="KV pages"):
        eng.add_request(prompt(40, 0), greedy(1))
    assert eng.blocks.num_free == 2 and not eng.has_unfinished()


def test_indexer_cache_only_for_full_layers(model):
    eng = make_engine(model, "1/4", num_kv_blocks=4)
    pat = eng.pattern
    assert [c is not None for c in eng.kv.index] == [pat.is_full(i) for i in range(8)]
    bpt = eng.cache_bytes
    cfg = model.config
    assert bpt["latent"] == 8 * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 4
    assert bpt["indexer"] == pat.num_full * cfg.index_head_dim * 4
    full = make_engine(model, None, num_kv_blocks=4).cache_bytes
    assert bpt["total"] < full["total"]
    pages = eng.kv.num_blocks + 1
    assert eng.kv.allocated_bytes() == pages * eng.cfg.page_size * bpt["total"]


def test_fp8_formats_report_published_sizes():
    from indexcache.engine import bytes_per_token
    from indexcache.presets import preset_config
    from indexcache.pattern import IndexPattern

    cfg = preset_config("glm-4.7-flash-dsa")
    full = bytes_per_token(cfg, IndexPattern.all_full(47), "fp8", "fp8")
    assert full["total"] == 47 * (656 + 132)
    q = bytes_per_token(cfg, IndexPattern.keep(47, "1/4"), "bf16", "fp8")
    assert q["indexer"] == 13 * 132 and q["latent"] == 47 * 1152


def test_errors(model):
    eng = make_engine(model, max_model_len=64)
    with pytest.raises(ValueError, match="max_model_len"):
        eng.add_request(prompt(64, 0), greedy(1))
    with pytest.raises(ValueError, match="vocabulary"):
        eng.add_request([1, 2, 10_000], greedy(1))
    with pytest.raises(PatternError):
        make_engine(model, "FFS")  # wrong length
    half = tiny_model(pattern="1/2")
    with pytest.raises(PatternError, match="no indexer"):
        make_engine(half, "all")  # S layers have no indexer weights to turn back into F
    with pytest.raises(ValueError, match="tokenizer"):
        from indexcache.sampling import SamplingParams
        eng.add_request([1, 2], SamplingParams(stop=["x"]))
    with pytest.raises(ValueError, match="fp8"):
        make_engine(model, kv_cache_dtype="fp8")  # the tiny latent is 64+16, not FlashMLA's 512+64


def test_stop_token_and_max_model_len(model):
    from indexcache.sampling import SamplingParams

    p = prompt(20, 5)
    ref, _ = reference_greedy(model, p, 4)
    eng = make_engine(model)
    toks, _ = run(eng, [p], SamplingParams(max_tokens=10, temperature=0, stop=[ref[2]], ignore_eos=True))
    assert toks[0] == ref[:3]
    eng = make_engine(model, max_model_len=23)
    toks, _ = run(eng, [p], greedy(10))
    assert toks[0] == ref[:3]  # 20 + 3 = max_model_len


def test_compiled_decode_equals_eager(model):
    # aot_eager traces the glue exactly as inductor would (graph breaks, guards, recompiles per batch size) without
    # generating code, so it runs in CI; the GPU test covers inductor under CUDA graphs
    prompts = [prompt(70, 1), prompt(40, 2)]
    ref = run(make_engine(model, "1/2"), prompts, greedy(5))
    out = run(make_engine(model, "1/2", compile_decode=True, compile_backend="aot_eager"), prompts, greedy(5))
    assert out[0] == ref[0]
    for a, b in zip(out[1], ref[1]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_block_table_mirror_follows_growth_and_release():
    from indexcache.engine.sequence import Sequence
    s = Sequence("r", [1, 2, 3], greedy(1), 0)
    s.block_table += [7, 3]
    assert s.table_array().tolist() == [7, 3]
    s.block_table += list(range(100, 140))  # past the mirror's capacity: it grows
    assert s.table_array().tolist() == [7, 3] + list(range(100, 140))
    s.block_table = [9]  # released and re-grown: a new list
    assert s.table_array().tolist() == [9]
    s.block_table.clear()
    assert s.table_array().tolist() == []


def test_fp32_indexer_weights_proj_in_a_bf16_model():
    # checkpoints keep weights_proj in fp32 beside bf16 weights: the fused x-projection must leave it apart
    m = tiny_model(3).to(torch.bfloat16)
    for layer in m.layers:
        if layer.self_attn.indexer is not None:
            layer.self_attn.indexer.weights_proj.float()
    p = prompt(70, 1)
    ref = run(make_engine(m, "1/2"), [p], greedy(3))
    for layer in m.layers:
        assert layer.self_attn.indexer is None or layer.self_attn.indexer.weights_proj.weight.dtype == torch.float32
    again = run(make_engine(m, "1/2"), [p], greedy(3))  # a second engine on the same (re-pointed) weights
    assert again[0] == ref[0]
    assert all(len(t) == 3 for t in ref[0])


def test_index_pattern_means_the_same_everywhere():
    """LLM(model, p) builds the model with p (load_model(..., index_pattern=p): S layers get no indexer weights);
    LLMEngine(model, cfg, index_pattern=p) runs p on a model built with every indexer. Same plan, same tokens."""
    from indexcache.checkpoint import load_model
    from indexcache.llm import LLM
    from indexcache.pattern import LayerRole

    llm = LLM("tiny", "1/2", max_model_len=128, max_num_seqs=2, seed=5)
    built = load_model("tiny", index_pattern="1/2", seed=5)
    full = load_model("tiny", seed=5)
    assert built.layers[2].self_attn.indexer is None and full.layers[2].self_attn.indexer is not None
    p = prompt(40, 7)
    # LLM(model, p) is load_model(model, index_pattern=p) served with the model's own pattern
    a, b = llm.engine, make_engine(built, max_model_len=128)
    assert a.plan == b.plan and str(a.plan) == "FFSFSFSF" and a.pattern == built.config.pattern
    assert a.plan[2] == LayerRole(runs_indexer=False, source=1) and a.plan[3] == LayerRole(True, 3)
    assert run(a, [p], greedy(4))[0] == run(b, [p], greedy(4))[0]
    # the same weights (the S layers' indexers dropped) serve the same tokens as a runtime pattern over all of them
    missing, unexpected = built.load_state_dict(full.state_dict(), strict=False)
    assert not missing and unexpected and all(".indexer." in k for k in unexpected)
    c, d = make_engine(built, max_model_len=128), make_engine(full, "1/2", max_model_len=128)
    assert c.plan == d.plan == a.plan
    toks_c, logits_c = run(c, [p], greedy(4))
    toks_d, logits_d = run(d, [p], greedy(4))
    assert toks_c == toks_d
    torch.testing.assert_close(logits_c[0], logits_d[0])
    with pytest.raises(PatternError, match="no indexer weights"):
        make_engine(built, "all", max_model_len=128)  # a runtime pattern cannot add indexers the model lacks


def test_cache_formats_decided_once(model):
    from indexcache.engine import EngineConfig
    from indexcache.engine.attention_backend import CacheFormats, resolve_formats
    from indexcache.presets import preset_config

    mc = preset_config("tiny").replace(index_head_dim=128)
    cpu, cuda = torch.device("cpu"), torch.device("cuda")  # resolve_formats only reads the device type
    assert resolve_formats(EngineConfig(), mc, torch.float32, cpu) == CacheFormats("fp32", "exact")
    assert resolve_formats(EngineConfig(), mc, torch.bfloat16, cuda) == CacheFormats("bf16", "fp8")
    assert resolve_formats(EngineConfig(page_size=32), mc, torch.bfloat16, cuda) == CacheFormats("bf16", "exact")
    with pytest.raises(ValueError, match="needs a CUDA device"):
        resolve_formats(EngineConfig(indexer_cache="fp8"), mc, torch.float32, cpu)
    with pytest.raises(ValueError, match="index_head_dim 128"):
        resolve_formats(EngineConfig(indexer_cache="fp8"), model.config, torch.bfloat16, cuda)
    with pytest.raises(ValueError, match="512\\+64"):
        resolve_formats(EngineConfig(kv_cache_dtype="fp8"), mc, torch.bfloat16, cuda)
    assert make_engine(model).backend.name == "torch"
