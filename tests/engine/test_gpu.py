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


def test_fp8_latent_prefill_routes_agree(monkeypatch):
    """FP8 latent cache: prefill over a dequantised copy of the context (the default for long chunks) against the
    kernels that read the 656-B rows. 256-token steps: the second holds the first prompt's last 44 tokens (each
    of its 300 context rows read ~9 times) and all 170 of the second prompt's (64 times), so at threshold 4 the
    copy spans two block tables and at 32 that step splits its rows between the two routes. The same attention
    up to bf16 / fp16 rounding."""
    from indexcache.engine import attention_backend

    model = _model(kv_lora_rank=512, qk_rope_head_dim=64, index_head_dim=128, index_topk=64)
    prompts = [torch.randint(0, 512, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (300, 170)]
    out = {}
    real = attention_backend.dequant_latent_rows
    copies = []
    monkeypatch.setattr(attention_backend, "dequant_latent_rows", lambda *a: copies.append(1) or real(*a))
    real_rows, split = attention_backend._ContextRows, []
    monkeypatch.setattr(attention_backend, "_ContextRows",
                        lambda slots, mine, others, n: split.append(mine is not None)
                        or real_rows(slots, mine, others, n))
    for reads in (4, 32, 10**9):
        monkeypatch.setattr(attention_backend, "FP8_PREFILL_DEQUANT_MIN_READS", reads)
        copies.clear()
        split.clear()
        eng = make_engine(model, "1/2", indexer_cache="fp8", kv_cache_dtype="fp8", max_model_len=512,
                          max_num_seqs=2, max_prefill_tokens=256)
        out[reads] = run(eng, prompts, greedy(1))[1]
        assert bool(copies) == (reads != 10**9) and any(split) == (reads == 32)
    for reads in (4, 32):
        for a, b in zip(out[reads], out[10**9]):
            torch.testing.assert_close(a, b, atol=3e-2, rtol=3e-2)


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


def test_decode_topk_graphs_equal_eager(monkeypatch):
    """FP8 indexer at the kernels' shapes, contexts longer than top-k: decode selects with topk_rows_decode on
    the backend's one workspace, shared by the graphs of batch buckets 1, 2 and 4 replayed in turn. Eager
    selections equal the reference's sets; graph replays equal eager decode; greedy tokens equal an engine that
    selects with topk_rows (decode_topk_max_rows=0)."""
    from indexcache.engine import attention_backend
    from indexcache.kernels.topk import topk_rows_decode, topk_rows_reference

    model = _model(kv_lora_rank=512, qk_rope_head_dim=64, index_head_dim=128, index_topk=64)
    prompts = [torch.randint(0, 512, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (300, 90, 200)]
    kw = dict(indexer_cache="fp8", max_model_len=512, max_num_seqs=4, compile_decode=False)
    eng = make_engine(model, "1/2", **kw)
    ws = eng.backend._dtopk
    assert eng.graphs is not None and ws is not None and ws.rows == 4 and ws.n == 512
    for p in prompts:
        eng.add_request(p, greedy(4))
    eng.step()  # prefill all three
    checked = []

    def decode_spy(logits, k, *, row_end, workspace):
        out = topk_rows_decode(logits, k, row_end=row_end, workspace=workspace)
        if not torch.cuda.is_current_stream_capturing():
            ref = topk_rows_reference(logits, k, row_end=row_end)
            assert torch.equal(out.sort(dim=1).values, ref.sort(dim=1).values)
            checked.append(logits.shape[0])
        return out

    monkeypatch.setattr(attention_backend, "topk_rows_decode", decode_spy)
    seqs = list(eng.scheduler.running)
    for rows in ([0, 1, 2], [1], [0, 2], [0, 1, 2]):  # buckets 4, 1, 2, then 4 again after the others
        b = eng.runner.prepare([(seqs[j].token_ids, seqs[j].num_computed, 1, seqs[j].block_table) for j in rows])
        b.max_len = eng.graphs.max_len  # eager over the same key range as the graph
        eager = eng.runner.forward(b).clone()
        graph = eng.graphs.run(b).clone()
        torch.testing.assert_close(graph, eager, atol=2e-2, rtol=2e-2)  # index order (atomics) moves the roundings
    assert checked and not ws.hist.any() and not ws.ctr.any()
    monkeypatch.undo()
    toks_new, lg_new = run(make_engine(model, "1/2", **kw), prompts, greedy(6))
    toks_old, lg_old = run(make_engine(model, "1/2", decode_topk_max_rows=0, **kw), prompts, greedy(6))
    assert toks_new == toks_old
    for a, c in zip(lg_new, lg_old):
        torch.testing.assert_close(a, c, atol=2e-2, rtol=2e-2)
