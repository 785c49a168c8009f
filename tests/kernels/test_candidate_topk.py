"""Re-rank scoring (kernels/candidate_topk): Triton (interpreter on CPU) vs the PyTorch reference on ragged,
-1-padded candidate pools over the paged FP8 key cache; poisoned outputs; ties; bad input."""
import pytest
import torch

from indexcache.kernels.candidate_topk import (candidate_logits, candidate_logits_reference, candidate_topk,
                                               candidate_topk_reference)
from indexcache.kernels.indexer import quantize_indexer_q
from indexcache.kernels.kv_store import new_indexer_cache, store_indexer_k
from indexcache.kernels.kv_store.reference import store_indexer_k_ref
from tests.helpers import poisoned


def _case(t, h, pages, c, seed, dup=False):
    """A cache with random keys in every slot, queries, and per-row pools of distinct random slots: row r has a
    random number of valid entries (some rows none), with -1 holes in the middle and padding at the end."""
    g = torch.Generator().manual_seed(seed)
    cache = new_indexer_cache(pages)
    n = pages * 64
    store_indexer_k_ref(cache, torch.arange(n), torch.randn(n, 128, generator=g))
    q8, w = quantize_indexer_q(torch.randn(t, h, 128, generator=g), torch.randn(t, h, generator=g))
    cand = torch.full((t, c), -1, dtype=torch.int32)
    for r in range(t):
        m = 0 if r == 1 else int(torch.randint(1, c + 1, (1,), generator=g))
        cand[r, :m] = torch.randperm(n, generator=g)[:m].to(torch.int32)
        if m > 3:
            cand[r, m // 2] = -1  # a hole inside the pool
        if dup and m > 4:
            cand[r, 1] = cand[r, 0]  # the same key twice: an exact tie
    return q8, w, cache, cand


@pytest.mark.parametrize("t,h,pages,c", [(5, 4, 3, 40), (3, 3, 2, 70), (1, 16, 4, 17)])
def test_candidate_logits_match_reference(t, h, pages, c):
    q8, w, cache, cand = _case(t, h, pages, c, seed=t + c)
    ref = candidate_logits_reference(q8, w, cache, cand)
    out = poisoned((t, c), torch.float32, "cpu")
    got = candidate_logits(q8, w, cache, cand, out=out)
    assert got.data_ptr() == out.data_ptr() and not bool(got.isnan().any())
    assert torch.equal(got == float("-inf"), cand < 0)
    fin = cand >= 0
    torch.testing.assert_close(got[fin], ref[fin], rtol=1e-5, atol=1e-5)
    assert float(ref[fin].abs().max()) > 0  # not all zeros


@pytest.mark.parametrize("span", [32, 64])
def test_candidate_logits_split_pool_matches_reference(span):
    """A pool split over several programs per row (decode-sized batches): spans of one and two blocks, a ragged
    last span (c = 70 is not a multiple of either)."""
    q8, w, cache, cand = _case(3, 8, 3, 70, seed=span)
    ref = candidate_logits_reference(q8, w, cache, cand)
    got = candidate_logits(q8, w, cache, cand, out=poisoned((3, 70), torch.float32, "cpu"), config=dict(span=span))
    assert torch.equal(got == float("-inf"), cand < 0)
    fin = cand >= 0
    torch.testing.assert_close(got[fin], ref[fin], rtol=1e-5, atol=1e-5)


def test_candidate_span_fills_the_gpu():
    from indexcache.kernels.candidate_topk.triton import candidate_span

    assert candidate_span(16384, 8192, 128, 132) == 8192      # enough rows: one program per row
    assert candidate_span(1, 8192, 128, 132) == 128           # one row: one block per program
    assert candidate_span(8, 8192, 128, 132) == 128 * 1       # 8 rows x 64 programs <= 528
    assert candidate_span(100, 8192, 128, 132) == 128 * 11    # 6 parts of 11 blocks (the last shorter)
    assert candidate_span(3, 70, 32, 1) == 64                 # 3 blocks, 2 parts


@pytest.mark.parametrize("k", [8, 64])
def test_candidate_topk_matches_reference_sets_and_scores(k):
    q8, w, cache, cand = _case(6, 4, 3, 48, seed=k, dup=True)
    got = candidate_topk(q8, w, cache, cand, k)
    ref = candidate_topk_reference(q8, w, cache, cand, k)
    assert got.shape == (6, k) and got.dtype == torch.int32
    logits = candidate_logits_reference(q8, w, cache, cand)
    for r in range(6):
        g, e = got[r], ref[r]
        assert int((g >= 0).sum()) == int((e >= 0).sum()) == min(k, int((cand[r] >= 0).sum()))
        assert bool((g[(g >= 0).sum():] == -1).all())
        assert set(g[g >= 0].tolist()) <= set(cand[r][cand[r] >= 0].tolist())
        # the selected scores agree (index sets may differ only among exact ties)
        score = {int(s): float(v) for s, v in zip(cand[r], logits[r]) if s >= 0}
        gs = sorted((score[int(s)] for s in g if s >= 0), reverse=True)
        es = sorted((score[int(s)] for s in e if s >= 0), reverse=True)
        assert gs == pytest.approx(es, rel=1e-6, abs=1e-7)
        kth = es[-1] if es else None
        if kth is not None:  # away from the threshold the sets are equal
            assert {int(s) for s in g if s >= 0 and score[int(s)] > kth} == \
                   {int(s) for s in e if s >= 0 and score[int(s)] > kth}


def _stable_topk(logits, cand, k):
    """The reference's selection applied to given logits: slot ids of the k largest, ties to the earlier pool
    entry, -inf never, -1 padded (as a sorted multiset per row for comparison)."""
    c = logits.shape[1]
    order = torch.sort(logits, dim=1, descending=True, stable=True).indices[:, : min(k, c)]
    ids = cand.gather(1, order).masked_fill(logits.gather(1, order) == float("-inf"), -1).to(torch.int32)
    return torch.nn.functional.pad(ids, (0, k - ids.shape[1]), value=-1)


def _assert_same_selection(got, exp):
    """Equal sets of slot ids per row, the -1 entries after the selected ones."""
    assert torch.equal(got.sort(1).values, exp.sort(1).values)
    n = (got >= 0).sum(1)
    assert bool(((torch.arange(got.shape[1])[None] >= n[:, None]) == (got < 0)).all())


def _tied_case(t, h, c, seed):
    """Pools over a cache whose 256 slots hold only 6 distinct keys: most logits of a row are exact ties between
    different slots, so the k-th score is shared by many entries and the tie rule decides the set."""
    g = torch.Generator().manual_seed(seed)
    cache = new_indexer_cache(4)
    keys = torch.randn(6, 128, generator=g)
    store_indexer_k_ref(cache, torch.arange(256), keys[torch.randint(0, 6, (256,), generator=g)])
    q8, w = quantize_indexer_q(torch.randn(t, h, 128, generator=g), torch.randn(t, h, generator=g))
    cand = torch.stack([torch.randperm(256, generator=g)[:c] for _ in range(t)]).to(torch.int32)
    cand[:, 3::11] = -1
    return q8, w, cache, cand


@pytest.mark.parametrize("span", [None, 32], ids=["fused", "split-then-select"])
@pytest.mark.parametrize("k", [5, 24, 70])
def test_candidate_topk_fused_selects_the_kernels_own_top_k(span, k):
    """Both Triton paths (one launch that scores and selects; the split scoring then the selection) pick exactly
    the stable top-k of the kernel's own logits: ragged pools with holes, a row without candidates, rows with
    fewer valid entries than k (k 70 > c 48), exact ties of duplicated slots; poisoned outputs fully written."""
    from indexcache.kernels.candidate_topk.triton import candidate_topk_triton

    q8, w, cache, cand = _case(6, 4, 3, 48, seed=k, dup=True)
    out = poisoned((6, k), torch.int32, "cpu")
    got = candidate_topk_triton(q8, w, cache, cand, k, out=out, config=dict(span=span) if span else None)
    assert got.data_ptr() == out.data_ptr()
    _assert_same_selection(got, _stable_topk(candidate_logits(q8, w, cache, cand), cand, k))
    assert int((got[1] >= 0).sum()) == 0  # row 1 has no candidates
    # and the reference's selection on its own logits has the same scores
    ref = candidate_topk_reference(q8, w, cache, cand, k)
    assert torch.equal((got >= 0).sum(1), (ref >= 0).sum(1))


@pytest.mark.parametrize("span", [None, 32], ids=["fused", "split-then-select"])
@pytest.mark.parametrize("k", [7, 30])
def test_candidate_topk_many_ties_at_the_threshold(span, k):
    """6 distinct keys over 60 candidates: the k-th score is shared by ~10 entries; the earlier pool entries of
    that tie are taken, the selected scores equal the reference's."""
    from indexcache.kernels.candidate_topk.triton import candidate_topk_triton

    q8, w, cache, cand = _tied_case(5, 4, 60, seed=k)
    got = candidate_topk_triton(q8, w, cache, cand, k, out=poisoned((5, k), torch.int32, "cpu"),
                                config=dict(span=span) if span else None)
    lg = candidate_logits(q8, w, cache, cand)
    exp = _stable_topk(lg, cand, k)
    _assert_same_selection(got, exp)
    ref_lg = candidate_logits_reference(q8, w, cache, cand)
    for r in range(5):
        score = {int(s): float(v) for s, v in zip(cand[r], ref_lg[r]) if s >= 0}
        kth = min(score[int(s)] for s in exp[r] if s >= 0)
        assert sum(v == kth for v in score.values()) > 1  # the threshold is a real tie
        ref = candidate_topk_reference(q8, w, cache, cand, k)[r]
        assert sorted(score[int(s)] for s in got[r] if s >= 0) == \
            pytest.approx(sorted(score[int(s)] for s in ref if s >= 0), rel=1e-6, abs=1e-7)


def test_select_topk_on_crafted_rows():
    """The selection alone on rows that scoring rarely gives: negative scores, +0.0 and -0.0 (equal: the earlier
    one wins), -inf and NaN (never selected), heavy ties, all invalid, k past the row, a row wider than a block."""
    from indexcache.kernels.candidate_topk.triton import select_topk_triton

    g = torch.Generator().manual_seed(3)
    t, c = 6, 300
    x = torch.randn(t, c, generator=g)
    x[0] = torch.randint(-3, 3, (c,), generator=g).float()             # 6 values: ties everywhere
    x[1, ::2], x[1, 1::2] = 0.0, -0.0                                  # signed zeros tie
    x[1, :50] = -1.0
    x[2, 5::3] = float("-inf")
    x[2, 7::5] = float("nan")
    x[3] = float("-inf")                                               # nothing valid
    x[4] = -torch.rand(c, generator=g) - 1                             # all negative
    cand = torch.stack([torch.randperm(100000, generator=g)[:c] for _ in range(t)]).to(torch.int32)
    cand[5, 100:] = -1
    x[5, 100:] = float("-inf")
    for k in (1, 37, 150, 299, 400):
        got = select_topk_triton(x, cand, k, out=poisoned((t, k), torch.int32, "cpu"))
        _assert_same_selection(got, _stable_topk(x.masked_fill(x.isnan(), float("-inf")), cand, k))


def test_candidate_topk_rejects_bad_input():
    q8, w, cache, cand = _case(2, 4, 2, 16, seed=0)
    with pytest.raises(ValueError, match="cand must be"):
        candidate_topk(q8, w, cache, cand.float(), 4)
    with pytest.raises(ValueError, match="past the cache's 128 slots"):
        candidate_topk(q8, w, cache, cand.clamp(max=0) + 500, 4)
    with pytest.raises(ValueError, match="w must be"):
        candidate_topk(q8, w[:, :3], cache, cand, 4)
    with pytest.raises(ValueError, match="q_fp8 must be"):
        candidate_topk(q8.float(), w, cache, cand, 4)
    with pytest.raises(ValueError, match="k must be >= 0, got -1"):
        candidate_topk(q8, w, cache, cand, -1)
    with pytest.raises(ValueError, match="out must be"):
        candidate_topk(q8, w, cache, cand, 4, out=torch.empty(2, 5, dtype=torch.int32))


@pytest.mark.gpu
@pytest.mark.parametrize("t,c", [(600, 8192), (2, 4096)], ids=["one-program-per-row", "split-pools"])
def test_candidate_logits_on_gpu_large_pools(t, c):
    """The compiled kernel (wgmma, pipelined gathers) on pools of the real sizes, against the reference (error
    against each row's largest logit: FP8 wgmma accumulates with a shortened mantissa)."""
    g = torch.Generator(device="cuda").manual_seed(c)
    pages = 300
    cache = new_indexer_cache(pages, device="cuda")
    store_indexer_k(cache, torch.arange(pages * 64, device="cuda"),
                    torch.randn(pages * 64, 128, device="cuda", generator=g))
    q8, w = quantize_indexer_q(torch.randn(t, 32, 128, device="cuda", generator=g),
                               torch.randn(t, 32, device="cuda", generator=g))
    cand = torch.randint(0, pages * 64, (t, c), device="cuda", generator=g, dtype=torch.int32)
    cand[:, 7::61] = -1
    cand[0, c // 2:] = -1
    got = candidate_logits(q8, w, cache, cand, out=poisoned((t, c), torch.float32, "cuda"))
    ref = candidate_logits_reference(q8, w, cache, cand)
    fin = cand >= 0
    assert torch.equal(got == float("-inf"), ~fin)
    scale = ref.masked_fill(~fin, 0).abs().amax(1, keepdim=True)
    assert float(((got - ref).masked_fill(~fin, 0).abs() / scale).max()) < 2e-3


@pytest.mark.gpu
@pytest.mark.parametrize("t", [600, 2], ids=["fused", "split-then-select"])
def test_candidate_topk_on_gpu_real_sizes(t):
    """Pools of 8192, top-k 2048, 32 heads, bf16-quantised queries: the selected scores (looked up in the scoring
    kernel's logits) are that logits' top-k, exactly on the split path (the same scoring kernel), within the FP8
    accumulation's noise on the fused one; poisoned outputs fully written."""
    g = torch.Generator(device="cuda").manual_seed(t)
    pages, c, k = 400, 8192, 2048
    cache = new_indexer_cache(pages, device="cuda")
    store_indexer_k(cache, torch.arange(pages * 64, device="cuda"),
                    torch.randn(pages * 64, 128, device="cuda", generator=g))
    q8, w = quantize_indexer_q(torch.randn(t, 32, 128, device="cuda", generator=g, dtype=torch.bfloat16),
                               torch.randn(t, 32, device="cuda", generator=g))
    cand = torch.stack([torch.randperm(pages * 64, device="cuda", generator=g)[:c] for _ in range(t)]).int()
    cand[:, 7::61] = -1
    cand[0, 1500:] = -1  # fewer valid than k
    got = candidate_topk(q8, w, cache, cand, k, out=poisoned((t, k), torch.int32, "cuda"))
    lg = candidate_logits(q8, w, cache, cand)
    exp = _stable_topk(lg, cand, k)
    assert torch.equal((got >= 0).sum(1), (exp >= 0).sum(1))
    n = (got >= 0).sum(1)
    assert bool(((torch.arange(k, device="cuda")[None] >= n[:, None]) == (got < 0)).all())
    # scores of the selected slots (pools hold distinct slots)
    score = torch.full((t, pages * 64), float("-inf"), device="cuda")
    score.scatter_(1, cand.clamp(min=0).long(), lg)
    sel = score.gather(1, got.clamp(min=0).long()).masked_fill(got < 0, float("-inf")).sort(1).values
    ref = score.gather(1, exp.clamp(min=0).long()).masked_fill(exp < 0, float("-inf")).sort(1).values
    if t <= 4:
        _assert_same_selection(got, exp)
    fin = ref > float("-inf")
    assert torch.equal(fin, sel > float("-inf"))
    tol = 1e-5 * lg.masked_fill(cand < 0, 0).abs().amax(1, keepdim=True)
    assert bool(((sel - ref).abs().masked_fill(~fin, 0) <= tol).all())
