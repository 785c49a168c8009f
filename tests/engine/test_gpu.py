"""GPU checks: CUDA-graph decode equals eager decode; the FP8 cache formats and kernels run end to end."""
import pytest
import torch

from indexcache.checkpoint import build_empty
from indexcache.presets import preset_config

from .helpers import greedy, run
from .helpers import make_engine as _make_engine

pytestmark = pytest.mark.gpu


def make_engine(model, pattern=None, **kw):
    kw.setdefault("num_kv_blocks", 64)  # do not size the cache from free GPU memory (the GPU may be shared)
    return _make_engine(model, pattern, **kw)


def _model(**changes):
    cfg = preset_config("tiny").replace(index_n_heads=16, **changes)
    return build_empty(cfg, "cuda", torch.bfloat16).init_random(5).eval()


def test_cuda_graph_decode_equals_eager():
    model = _model()
    prompts = [torch.randint(0, 512, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (70, 9, 33)]
    eng = make_engine(model, "1/2", max_num_seqs=4, compile_decode=False)  # graphs alone (compile: below)
    assert eng.graphs is not None
    for p in prompts:
        eng.add_request(p, greedy(4))
    eng.step()  # prefill all three
    b = eng.runner.prepare([(s.token_ids, s.num_computed, 1, s.block_table) for s in eng.scheduler.running])
    assert b.decode
    b.max_len = eng.graphs.max_len  # eager over the same key range as the graph
    eager = eng.runner.forward(b).clone()
    graph = eng.graphs.run(b).clone()
    torch.testing.assert_close(graph, eager, atol=0, rtol=0)
    # end to end: same tokens with and without graphs
    toks_g, lg_g = run(make_engine(model, "1/2", max_num_seqs=4, compile_decode=False), prompts, greedy(6))
    toks_e, lg_e = run(make_engine(model, "1/2", max_num_seqs=4, enforce_eager=True), prompts, greedy(6))
    assert toks_g == toks_e
    for a, c in zip(lg_g, lg_e):
        torch.testing.assert_close(a, c, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("latent", ["bf16", "fp8"])
def test_fp8_indexer_and_latent_formats_run(latent):
    # the real kernel shapes: 512 + 64 latent, 128-dim indexer
    model = _model(kv_lora_rank=512, qk_rope_head_dim=64, index_head_dim=128, index_topk=64)
    p = torch.randint(0, 512, (300,), generator=torch.Generator().manual_seed(0)).tolist()
    exact = run(make_engine(model, "1/2", indexer_cache="exact", max_model_len=512), [p], greedy(4))[1][0]
    fast = make_engine(model, "1/2", indexer_cache="fp8", kv_cache_dtype=latent, max_model_len=512,
                       max_prefill_tokens=128)
    assert fast.kv.indexer_format == "fp8"
    lg = run(fast, [p], greedy(4))[1][0]
    cos = torch.nn.functional.cosine_similarity(lg[0], exact[0], dim=0)
    assert cos > 0.98, cos  # FP8 keys change the selection slightly; logits stay close


def test_compiled_decode_under_cuda_graphs_matches_eager():
    # torch.compile fuses the bf16 glue (other roundings), so logits agree to bf16 tolerance, not bit for bit;
    # greedy tokens of a random model can flip on near-ties, so one decode step is compared, not a generation
    model = _model()
    prompts = [torch.randint(0, 512, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (70, 9, 33)]
    eng = make_engine(model, "1/2", max_num_seqs=4, compile_decode=True)
    for p in prompts:
        eng.add_request(p, greedy(4))
    eng.step()  # prefill all three (not compiled)
    b = eng.runner.prepare([(s.token_ids, s.num_computed, 1, s.block_table) for s in eng.scheduler.running])
    b.max_len = eng.graphs.max_len
    compiled_graph = eng.graphs.run(b).clone()
    fns, eng.runner._decode_fns = eng.runner._decode_fns, None
    eager = eng.runner.forward(b).clone()
    eng.runner._decode_fns = fns
    assert torch.isfinite(compiled_graph).all()
    cos = torch.nn.functional.cosine_similarity(compiled_graph, eager, dim=-1)
    assert (cos > 0.999).all(), cos
    torch.testing.assert_close(compiled_graph, eager, atol=5e-2 * float(eager.abs().max()), rtol=5e-2)
