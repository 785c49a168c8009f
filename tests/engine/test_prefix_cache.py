"""Automatic prefix caching: shared pages give the same tokens as no sharing, really skip prefill, and all come back."""
import pytest
import torch

from .helpers import greedy, make_engine, run, tiny_model


@pytest.fixture(scope="module")
def model():
    return tiny_model(5)


def prompt(n, seed):
    return torch.randint(0, 512, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def one_by_one(eng, prompts, params):
    """Each request alone after the previous one finished (so later ones find the earlier ones' pages)."""
    toks, logits = [], []
    for p in prompts:
        t, lg = run(eng, [p], params)
        toks.append(t[0])
        logits.append(lg[0])
    return toks, logits


def all_pages_free(eng):
    b = eng.blocks
    return b.num_free == b.num_blocks and not any(b.ref)


@pytest.mark.parametrize("pattern", [None, "1/2"], ids=["full", "keep-1/2"])
def test_shared_document_equals_no_cache(model, pattern):
    doc = prompt(100, 1)  # longer than top-k (32): the indexer's selection over cached keys matters
    prompts = [doc + prompt(n, 10 + n) for n in (7, 16, 30)] + [doc[:64], doc + prompt(7, 17)]
    cached = make_engine(model, pattern, page_size=16)
    plain = make_engine(model, pattern, page_size=16, enable_prefix_caching=False)
    t_c, l_c = one_by_one(cached, prompts, greedy(5))
    t_p, l_p = one_by_one(plain, prompts, greedy(5))
    assert t_c == t_p
    for a, b in zip(l_c, l_p):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    assert cached.blocks.hit_tokens > 0 and plain.blocks.hit_tokens == 0
    assert all_pages_free(cached) and all_pages_free(plain)


def test_shared_prefix_skips_prefill(model):
    page = 16
    doc = prompt(8 * page, 2)
    q1, q2 = prompt(13, 3), prompt(21, 4)
    eng = make_engine(model, "1/2", page_size=page)
    run(eng, [doc + q1], greedy(4))
    assert eng.num_computed_tokens == len(doc + q1) + 3  # the last sampled token is never run
    before = eng.num_computed_tokens
    (toks,), _ = run(eng, [doc + q2], greedy(4))
    assert eng.num_computed_tokens - before == len(q2) + 3  # the whole document came from the cache
    assert eng.blocks.hit_tokens == len(doc)
    # a prompt that is all cached full pages still recomputes its last page (its last token needs logits)
    before = eng.num_computed_tokens
    run(eng, [doc], greedy(2))
    assert eng.num_computed_tokens - before == page + 1
    plain = make_engine(model, "1/2", page_size=page, enable_prefix_caching=False)
    assert run(plain, [doc + q2], greedy(4))[0][0] == toks
    assert all_pages_free(eng)


def test_concurrent_requests_share_pages(model):
    doc = prompt(64, 6)
    prompts = [doc + prompt(5 + i, 30 + i) for i in range(4)]
    eng = make_engine(model, "1/2", page_size=16, max_prefill_tokens=40)
    run(eng, [prompts[0]], greedy(2))  # warms the cache
    seqs = [eng.add_request(p, greedy(6)) for p in prompts[1:]]
    eng.step()
    tables = [s.block_table[:4] for s in seqs]
    assert tables[0] == tables[1] == tables[2]  # the document's pages are shared, not copied
    assert all(eng.blocks.ref[b] == 3 for b in tables[0])
    while eng.has_unfinished():
        eng.step()
    plain = make_engine(model, "1/2", page_size=16, enable_prefix_caching=False)
    assert [s.output_ids for s in seqs] == run(plain, prompts[1:], greedy(6))[0]
    assert all_pages_free(eng)


def test_eviction_pressure_equals_no_cache(model):
    """Few pages: cached prefixes are evicted (least recently used first) while others are shared."""
    docs = [prompt(48, 40 + i) for i in range(3)]
    prompts = [docs[i % 3] + prompt(5 + i, 50 + i) for i in range(9)]
    kw = dict(page_size=16, num_kv_blocks=9, max_num_seqs=2, max_prefill_tokens=40)
    eng = make_engine(model, "1/2", **kw)
    plain = make_engine(model, "1/2", enable_prefix_caching=False, **kw)
    t_c, _ = run(eng, prompts, greedy(12))
    t_p, _ = run(plain, prompts, greedy(12))
    assert t_c == t_p
    t_c, _ = one_by_one(eng, prompts[:4], greedy(8))  # again, now from a full, mostly cached pool
    t_p, _ = one_by_one(plain, prompts[:4], greedy(8))
    assert t_c == t_p
    assert eng.blocks.hit_tokens > 0
    assert all_pages_free(eng) and all_pages_free(plain)


def test_lru_eviction_order():
    from indexcache.engine.block_manager import BlockManager
    from indexcache.engine.sequence import Sequence

    bm = BlockManager(4, 2, enable_prefix_caching=True)
    a = Sequence("a", [1, 2, 3, 4, 5], greedy(1), 0)
    bm.grow(a, 5)
    a.num_computed = 5
    bm.commit(a)
    assert bm.num_cached == 2  # two full pages; the third (one token) is not named
    bm.release(a)
    assert bm.num_free == 4 and bm.num_cached == 2
    b = Sequence("b", [9] * 5, greedy(1), 0)
    bm.grow(b, 5)  # 3 pages: the two empty ones, then the old prefix's tail page (evicted before its head)
    assert bm.num_cached == 1 and bm.num_free == 1
    c = Sequence("c", [1, 2, 3, 4, 5], greedy(1), 0)
    assert bm.match_prefix(c) == 2 and c.num_computed == 2  # the head is still found
    assert bm.num_free == 0
    bm.release(b)
    bm.release(c)
    assert bm.num_free == 4 and not any(bm.ref)


def test_abort_frees_pages_at_once(model):
    eng = make_engine(model, page_size=16)
    s = eng.add_request(prompt(40, 7), greedy(50))
    eng.step()
    eng.step()
    assert eng.blocks.num_free < eng.blocks.num_blocks
    eng.abort(s)
    assert all_pages_free(eng) and not eng.has_unfinished()


@pytest.mark.gpu
@pytest.mark.parametrize("latent", ["bf16", "fp8"])
def test_prefix_cache_with_fp8_indexer_pages_on_gpu(latent):
    """The FP8 indexer cache keeps 64 keys and their scales per page: a shared page must carry both."""
    from indexcache.checkpoint import build_empty
    from indexcache.presets import preset_config

    cfg = preset_config("tiny").replace(index_n_heads=16, kv_lora_rank=512, qk_rope_head_dim=64, index_head_dim=128,
                                        index_topk=64)
    model = build_empty(cfg, "cuda", torch.bfloat16).init_random(5).eval()
    doc = prompt(256, 8)
    kw = dict(indexer_cache="fp8", kv_cache_dtype=latent, max_model_len=512, num_kv_blocks=32, max_prefill_tokens=128)
    cached = make_engine(model, "1/2", **kw)
    assert cached.kv.indexer_format == "fp8"
    run(cached, [doc + prompt(20, 9)], greedy(2))
    before = cached.num_computed_tokens
    _, lg_c = run(cached, [doc + prompt(30, 10)], greedy(3))
    assert cached.num_computed_tokens - before == 30 + 2  # the document's 4 pages came from the cache
    _, lg_p = run(make_engine(model, "1/2", enable_prefix_caching=False, **kw), [doc + prompt(30, 10)], greedy(3))
    cos = torch.nn.functional.cosine_similarity(lg_c[0][0], lg_p[0][0], dim=0)
    assert cos > 0.995, cos
    assert all_pages_free(cached)



@pytest.fixture
def deterministic():
    """torch.use_deterministic_algorithms for one test (warn_only: ops without a deterministic version still run),
    buffers not NaN-filled, both settings restored afterwards."""
    import torch.utils.deterministic as tud

    was, was_warn, fill = (torch.are_deterministic_algorithms_enabled(),
                           torch.is_deterministic_algorithms_warn_only_enabled(), tud.fill_uninitialized_memory)
    torch.use_deterministic_algorithms(True, warn_only=True)
    tud.fill_uninitialized_memory = False
    yield
    torch.use_deterministic_algorithms(was, warn_only=was_warn)
    tud.fill_uninitialized_memory = fill


@pytest.mark.gpu
@pytest.mark.parametrize("latent", ["bf16", "fp8"])
def test_prefix_cache_on_gpu_equals_no_cache_exactly(latent, deterministic):
    """Strict form of the test above: the uncached run's prefill chunks end where the cached prefix ends (page 4),
    so the question's 80 tokens are computed from the same inputs in both runs, and with deterministic algorithms
    (the MoE's bf16 index_add_ otherwise adds in a racy order) the first-token logits must be bit-identical. 80 > 64
    rows keeps the indexer top-k on its atomic-free prefill path. Any shared-page error (FP8 keys or scales, latent
    rows, slots of the cached pages, positions) changes them. One token only: no decode step, so no CUDA graph is
    captured under the deterministic mode (the test above covers decode over shared pages)."""
    from indexcache.checkpoint import build_empty
    from indexcache.presets import preset_config

    cfg = preset_config("tiny").replace(index_n_heads=16, kv_lora_rank=512, qk_rope_head_dim=64, index_head_dim=128,
                                        index_topk=64)
    model = build_empty(cfg, "cuda", torch.bfloat16).init_random(5).eval()
    doc, question = prompt(256, 8), prompt(80, 10)
    kw = dict(indexer_cache="fp8", kv_cache_dtype=latent, max_model_len=512, num_kv_blocks=32, max_prefill_tokens=128)
    cached = make_engine(model, "1/2", **kw)
    run(cached, [doc + prompt(80, 9)], greedy(1))
    before = cached.num_computed_tokens
    _, lg_c = run(cached, [doc + question], greedy(1))
    assert cached.num_computed_tokens - before == 80  # the document's 4 pages came from the cache
    plain = [run(make_engine(model, "1/2", enable_prefix_caching=False, **kw), [doc + question], greedy(1))[1][0][0]
             for _ in range(2)]
    assert torch.equal(plain[0], plain[1]), "two uncached runs differ: the premise (determinism) fails"
    assert torch.equal(lg_c[0][0], plain[0]), (lg_c[0][0] - plain[0]).abs().max()
    assert all_pages_free(cached)
