"""Re-rank (R) layers in the engine (CPU, TorchBackend, exact indexer keys) against the reference model."""
import pytest
import torch

from indexcache.pattern import IndexPattern

from .helpers import greedy, make_engine, reference_greedy, run, tiny_model


@pytest.fixture(scope="module")
def model():
    return tiny_model(3)


def prompt(n, seed):
    return torch.randint(0, 512, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("chunk", [4096, 24], ids=["whole-prefill", "chunked"])
def test_rerank_greedy_equals_reference(model, chunk):
    pat = IndexPattern("FRSRFRSS", pool=48)  # top-k 32 < pool 48 < prompt 70: the pool restricts R layers
    p = prompt(70, 1)
    eng = make_engine(model, pat, max_prefill_tokens=chunk)
    assert eng.plan.pool == 48 and eng.plan[1].reranks and eng.plan[0].publishes_pool == 48
    toks, logits = run(eng, [p], greedy(6))
    ref_toks, ref_logits = reference_greedy(model, p, 6, pattern=pat)
    assert toks[0] == ref_toks
    torch.testing.assert_close(logits[0], ref_logits, atol=2e-4, rtol=1e-4)
    # and it differs from sharing the F layer's selection (the R layers did select on their own)
    _, shared = reference_greedy(model, p, 6, pattern="FSSSFSSS")
    assert not torch.allclose(ref_logits, shared, atol=1e-3)


def test_indexer_cache_for_full_and_rerank_layers_only(model):
    eng = make_engine(model, IndexPattern("FRSSFRSS", pool=40), num_kv_blocks=4)
    assert [c is not None for c in eng.kv.index] == [True, True, False, False, True, True, False, False]
    bpt = eng.cache_bytes
    assert bpt["indexer"] == 4 * model.config.index_head_dim * 4 and bpt["num_indexer_cache_layers"] == 4
    assert bpt["num_full_layers"] == 2


@pytest.mark.gpu
@pytest.mark.parametrize("pool", [256, 128])
def test_rerank_on_gpu_fp8_kernels_and_cuda_graphs(pool):
    """The Triton backend (FP8 keys, kernels/candidate_topk) against exact keys; CUDA-graph decode runs R layers."""
    from indexcache.checkpoint import build_empty
    from indexcache.presets import preset_config

    cfg = preset_config("tiny").replace(index_n_heads=16, kv_lora_rank=512, qk_rope_head_dim=64, index_head_dim=128,
                                        index_topk=64)
    m = build_empty(cfg, "cuda", torch.bfloat16).init_random(5).eval()
    pat = IndexPattern("FRSRFRSS", pool=pool)
    p = prompt(300, 0)
    kw = dict(num_kv_blocks=64, max_model_len=512)
    exact = run(make_engine(m, pat, indexer_cache="exact", **kw), [p], greedy(4))[1][0]
    fast = make_engine(m, pat, indexer_cache="fp8", max_prefill_tokens=128, **kw)
    assert fast.kv.indexer_format == "fp8" and fast.graphs is not None
    toks, lg = run(fast, [p], greedy(4))
    cos = torch.nn.functional.cosine_similarity(lg[0][0], exact[0], dim=0)
    assert cos > 0.98, cos  # FP8 keys change the selection slightly; logits stay close
    eager = run(make_engine(m, pat, indexer_cache="fp8", max_prefill_tokens=128, enforce_eager=True, **kw),
                [p], greedy(4))[0]
    assert toks == eager


@pytest.mark.parametrize("k,c", [(100, 4100), (300, 120)], ids=["pool-wider-than-MAX_K", "pool-narrower-than-topk"])
def test_topk_then_pool_matches_the_reference(k, c):
    """An F layer's prefill selection [top-k | top-c] per row (Triton interpreter on the CPU), each part the
    reference's set. Ties at both thresholds, a row with fewer valid than c, a causal end."""
    from indexcache.engine.attention_backend import _topk_then_pool
    from indexcache.kernels.topk.reference import topk_rows_reference

    g = torch.Generator().manual_seed(k + c)
    rows, n = 3, 5000
    logits = (torch.randn(rows, n, generator=g) * 4).round()  # ties at both thresholds
    logits[1, 100:] = float("-inf")  # fewer valid than c: -1 padding
    end = torch.full((rows,), n, dtype=torch.int32)
    end[2] = n - 500
    got = _topk_then_pool(k)(logits, k + c, row_start=None, row_end=end)
    assert got.shape == (rows, k + c)
    for part, width in ((got[:, :k], k), (got[:, k:], c)):
        ref = topk_rows_reference(logits, width, row_end=end)
        assert torch.equal(part.sort(1).values, ref.sort(1).values)


def test_pool_selection_declares_its_scratch_to_the_chunk_planner():
    """An F layer's [top-k | top-c] selection budgets the wider selection's scratch and both outputs, not the
    generic SLOT_BYTES per slot (which under-counted the pool's one-launch scratch)."""
    from indexcache.engine.attention_backend import _topk_then_pool
    from indexcache.kernels.indexer import SLOT_BYTES, selection_slot_bytes
    from indexcache.kernels.topk import pool_scratch_bytes_per_row

    k, c, n = 2048, 8192, 200_000
    per_slot = selection_slot_bytes(_topk_then_pool(k), k + c, n)
    need = pool_scratch_bytes_per_row(c, n) + 4 * k + 8 * (k + c)
    assert per_slot * (k + c) >= need > SLOT_BYTES * (k + c)
    assert (per_slot - 1) * (k + c) < need


def test_rerank_ties_go_to_the_lower_position_whatever_the_pool_order(monkeypatch):
    """Every candidate of a shuffled pool has the same key, so every score ties: TritonBackend's R layer (FP8 keys,
    candidate_topk with tie ids, in the interpreter) keeps the k lowest positions, the rule of the F layers'
    topk_rows. Slot ids are laid out in reverse position order, so a rule by slot id or by pool entry would pick
    other keys. (TorchBackend scores the pool in position order and leaves ties to torch.topk, as the model
    does.)"""
    backend = "triton"
    from indexcache.checkpoint import build_empty
    from indexcache.engine import engine as engine_module
    from indexcache.engine.attention_backend import CacheFormats, TritonBackend
    from indexcache.presets import preset_config

    cfg = preset_config("tiny").replace(num_layers=2, kv_lora_rank=512, qk_rope_head_dim=64, index_head_dim=128,
                                        index_topk=16, num_heads=2, index_n_heads=2)
    m = build_empty(cfg, "cpu", torch.float32).init_random(2).eval()
    monkeypatch.setattr(engine_module, "resolve_formats", lambda *a: CacheFormats("fp32", "fp8"))
    monkeypatch.setattr(engine_module, "make_backend", TritonBackend)
    eng = make_engine(m, IndexPattern("FR", pool=40), max_model_len=256, max_num_seqs=1, page_size=64)
    be = eng.backend
    assert be.name == backend
    n_slots = 256
    key = torch.randn(1, 128).expand(n_slots, -1)
    be.store_index_k(1, torch.arange(n_slots), key)
    g = torch.Generator().manual_seed(0)
    positions = torch.stack([torch.randperm(200, generator=g)[:40] for _ in range(3)]).to(torch.int32)
    positions[2, 30:] = -1                                   # a row with ten empty pool entries
    cand = torch.where(positions < 0, -1, n_slots - 1 - positions).to(torch.int32)
    q, w = torch.randn(3, 2, 128, generator=g), torch.rand(3, 2, generator=g) + 0.5
    got = be.rerank(1, m.layers[1].self_attn.indexer, q, w, cand, positions)
    for r in range(3):
        want = sorted(positions[r][positions[r] >= 0].tolist())[:16]
        assert sorted((n_slots - 1 - got[r][got[r] >= 0]).tolist()) == want, r
