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


def test_candidate_topk_selects_in_pool_order_and_wide_pools_take_topk_rows(monkeypatch):
    """Pools of up to MAX_SHORT: ``topk_slots`` (the selection and its slot ids in one launch, in pool order);
    wider pools: ``topk_rows`` and a gather (the same sets). MAX_SHORT lowered so a small pool is "wide"."""
    from indexcache.kernels.candidate_topk import ops, topk_slots_reference

    q8, w, cache, cand = _case(5, 4, 3, 60, seed=3, dup=True)
    k = 16
    got = candidate_topk(q8, w, cache, cand, k)
    assert torch.equal(got, topk_slots_reference(candidate_logits(q8, w, cache, cand), cand, k))
    monkeypatch.setattr(ops, "MAX_SHORT", 32)
    wide = candidate_topk(q8, w, cache, cand, k)
    assert torch.equal(wide.sort(1).values, got.sort(1).values)


def test_candidate_topk_ties_by_tie_ids_narrow_and_wide(monkeypatch):
    """``tie_ids`` (the pool's key positions): ties go to the lower id, in topk_slots (narrow pools) and in the
    wide pools' sort-by-id then topk_rows; duplicate candidates make exact ties."""
    from indexcache.kernels.candidate_topk import ops

    q8, w, cache, cand = _case(5, 4, 3, 60, seed=4, dup=True)
    g = torch.Generator().manual_seed(4)
    ids = torch.stack([torch.randperm(600, generator=g)[:60] for _ in range(5)]).to(torch.int32)
    ids[cand < 0] = -1
    k = 16
    got = candidate_topk(q8, w, cache, cand, k, tie_ids=ids)
    assert torch.equal(got, candidate_topk_reference(q8, w, cache, cand, k, ids))
    monkeypatch.setattr(ops, "MAX_SHORT", 32)
    wide = candidate_topk(q8, w, cache, cand, k, tie_ids=ids)
    assert torch.equal(wide.sort(1).values, got.sort(1).values)


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
