"""The fused candidates kernel (``_prefill_candidates_atomic_kernel``: slots by atomic increments, lists in
no particular order) against the PyTorch reference, and the fused top-k's column tie rule on unordered lists:
fresh random inputs, ragged windows, blocks with inner tiles (windows covering whole tiles) and edge tiles,
NaN / infinite scores, heavy ties at the threshold, overflowing lists, NaN-poisoned outputs."""
import pytest
import torch

from indexcache.kernels.indexer import (fused_params, indexer_logits, indexer_logits_ref, indexer_prefill_candidates,
                                        indexer_topk_prefill_fused, prefill_candidates_ref, quantize_indexer_k,
                                        quantize_indexer_q)
from indexcache.kernels.indexer import ops
from indexcache.kernels.topk.reference import topk_rows_reference
from tests.helpers import poisoned


def _inputs(t, s, h, device, seed):
    g = torch.Generator().manual_seed(seed)
    q8, w = quantize_indexer_q(torch.randn(t, h, 128, generator=g).to(device),
                               torch.randn(t, h, generator=g).to(device))
    k8, ks = quantize_indexer_k(torch.randn(s, 128, generator=g).to(device))
    return q8, w, k8, ks


def _check_lists(vals, cols, counts, logits, thr, cap, poison=False):
    """The kernel's lists against ``prefill_candidates_ref`` on the same logits. Counts equal; in each row the
    written slots (the first min(count, cap); slots past them are never written, so they are only compared with
    the poison when ``poison``) hold distinct candidates with their own scores, bit-identical; rows that did not
    overflow hold the reference's candidates exactly, as sets (the kernel's order is free). Rows that overflowed
    hold some ``cap`` of their candidates (which ones is up to the kernel)."""
    rv, rc, rn = prefill_candidates_ref(logits, thr, cap)
    assert torch.equal(counts, rn)
    n = counts[:, 0].clamp(max=cap)
    written = torch.arange(cap, device=n.device)[None, :] < n[:, None]
    assert bool((((cols >= 0) & (cols < logits.shape[1])) | ~written).all())
    c = torch.where(written, cols, 0).long()
    take = ~torch.isnan(logits) & (logits != float("-inf")) & (logits >= thr[:, None])
    assert bool((torch.gather(take, 1, c) | ~written).all())  # every written column is a candidate
    assert torch.equal(torch.where(written, vals, 0.0), torch.where(written, torch.gather(logits, 1, c), 0.0))
    big = torch.iinfo(torch.int32).max
    mine = torch.where(written, cols, big).sort(1).values
    assert bool(((mine[:, 1:] != mine[:, :-1]) | (mine[:, 1:] == big)).all())  # no column twice
    fits = counts[:, 0] <= cap
    ref = torch.where(written, rc, big).sort(1).values
    assert torch.equal(mine[fits], ref[fits])
    ref_vals = torch.where(written, rv, 0.0).gather(1, torch.where(written, rc, big).sort(1).indices)
    mine_vals = torch.where(written, vals, 0.0).gather(1, torch.where(written, cols, big).sort(1).indices)
    assert torch.equal(mine_vals[fits], ref_vals[fits])  # the reference's values, column by column
    if poison:
        assert bool(torch.isnan(vals[~written]).all()) and bool((cols[~written] == -7777).all())


@pytest.mark.parametrize("h", [32, 20])
def test_atomic_candidates_match_reference(h, device):
    """Rows 0-3 and 4-7 share long windows (inner tiles, where the window test is skipped); rows 8-11 are ragged
    (an empty row, a row clipped past S, windows starting mid-tile). Key 150 (inside the inner tiles) is NaN
    (its scale) and key 30 has an infinite scale: the valid counts then come from the recount pass."""
    t, s, cap = 12, 333, 40
    q8, w, k8, ks = _inputs(t, s, h, device, seed=31 + h)
    ks = ks.clone()
    ks[150] = float("nan")
    ks[30] = float("inf")
    rs = torch.tensor([0, 0, 0, 0, 5, 9, 2, 0, 7, 64, 100, 290], dtype=torch.int32)
    re = torch.tensor([320, 321, 330, 333, 300, 333, 310, 290, 7, 200, 101, 400], dtype=torch.int32)
    rs, re = rs.to(device), re.to(device)
    logits = indexer_logits(q8, w, k8, ks, rs, re)
    assert bool(torch.isnan(logits[0, 150])) and bool(torch.isinf(logits[:8, 30]).any())
    fin = torch.where(torch.isfinite(logits), logits, float("nan"))
    thr = fin.nanquantile(0.9, dim=1).nan_to_num(0.0)
    thr[1] = float("-inf")                      # every valid score: overflows cap
    thr[2] = float("inf")                       # only +inf scores
    thr[5] = fin[5].nanquantile(0.5)            # overflows
    thr[9] = logits[9, 100]                     # a score of the row itself (>= keeps it)
    out = (poisoned((t, cap), torch.float32, device), poisoned((t, cap), torch.int32, device),
           poisoned((t, 2), torch.int32, device))
    vals, cols, counts = indexer_prefill_candidates(q8, w, k8, ks, rs, re, thr, cap, out=out)
    assert vals.data_ptr() == out[0].data_ptr() and counts.data_ptr() == out[2].data_ptr()
    assert int(counts[1, 0]) > cap and int(counts[5, 0]) > cap and int(counts[8, 0]) == int(counts[8, 1]) == 0
    assert int(counts[0, 1]) < int(re[0] - rs[0])  # the NaN / -inf scores are not counted as valid
    _check_lists(vals, cols, counts, logits, thr, cap, poison=True)
    with pytest.raises(ValueError, match="kernel"):  # a config key the launcher does not know is an error
        indexer_prefill_candidates(q8, w, k8, ks, rs, re, thr, cap, config={"kernel": "scan"})


def test_atomic_candidates_ties_at_threshold(device):
    """Hundreds of keys give one score, and the threshold is that score: every copy is a candidate."""
    t, s, h, cap = 8, 300, 32, 512
    q8, w, k8, ks = _inputs(t, s, h, device, seed=41)
    k8[40:290] = k8[3]
    ks[40:290] = ks[3]
    rs = torch.zeros(t, dtype=torch.int32, device=device)
    re = torch.tensor([300, 299, 290, 260, 200, 130, 64, 3], dtype=torch.int32, device=device)
    logits = indexer_logits(q8, w, k8, ks, rs, re)
    thr = logits[:, 3].contiguous()
    out = (poisoned((t, cap), torch.float32, device), poisoned((t, cap), torch.int32, device),
           poisoned((t, 2), torch.int32, device))
    vals, cols, counts = indexer_prefill_candidates(q8, w, k8, ks, rs, re, thr, cap, out=out)
    assert int(counts[0, 0]) >= 251
    _check_lists(vals, cols, counts, logits, thr, cap, poison=True)


def _dense_topk(cv, cc, kept, s, k):
    """The exact selection (ties: lower column) over each row laid out densely by column."""
    dense = torch.full((cv.shape[0], s), float("-inf"))
    for r in range(cv.shape[0]):
        n = int(kept[r])
        dense[r, cc[r, :n].long()] = cv[r, :n]
    return topk_rows_reference(dense, k)


@pytest.mark.parametrize("seed", [0, 1])
def test_select_by_column_on_shuffled_lists(seed):
    """Lists in random order with many ties (scores from a handful of values): the selected columns equal the
    exact selection's, whose ties go to the lower column."""
    g = torch.Generator().manual_seed(seed)
    rows, cap, s, k = 9, 64, 500, 12
    cc = torch.stack([torch.randperm(s, generator=g)[:cap] for _ in range(rows)]).to(torch.int32)
    cv = torch.randint(0, 4, (rows, cap), generator=g).float() + torch.randn(rows, 1, generator=g)
    cv[0] = 1.5                                  # one value throughout
    kept = torch.randint(0, cap + 1, (rows,), generator=g)
    kept[0], kept[1], kept[2] = cap, 0, k - 3  # all tied; empty; fewer than k
    cv = torch.where(torch.arange(cap)[None, :] < kept[:, None], cv, torch.nan)  # garbage past the kept ones
    pos = topk_rows_reference(cv, k, row_start=torch.zeros_like(kept), row_end=kept)
    got = ops._select_by_column(cv, cc, kept, pos)
    ref = _dense_topk(cv, cc, kept, s, k)
    assert torch.equal(got.sort(1).values, ref.sort(1).values)
    n = (got >= 0).sum(1)
    assert all(bool((got[r, int(n[r]):] == -1).all()) for r in range(rows))  # -1 only as trailing padding


def test_fused_topk_prefill_unordered_lists(monkeypatch, device):
    """The fused top-k with the candidate lists shuffled (the order the atomic kernel may leave them in on a GPU)
    and hundreds of scores tied at the k-th: the sets stay the exact ones, without the fallback."""
    t, s, h, topk = 6, 400, 32, 24
    q8, w, k8, ks = _inputs(t, s, h, device, seed=43)
    k8[50:380] = k8[7]
    ks[50:380] = ks[7] * 64  # the copies outrank every other key: the k-th score of each row is theirs
    w = w.abs()
    rs = torch.zeros(t, dtype=torch.int32, device=device)
    re = torch.tensor([400, 399, 390, 385, 300, 250], dtype=torch.int32, device=device)
    real = ops.indexer_prefill_candidates

    def shuffled(*a, **kw):
        cv, cc, cnt = real(*a, **kw)
        g = torch.Generator().manual_seed(5)
        for r in range(cv.shape[0]):
            n = min(int(cnt[r, 0]), cv.shape[1])
            p = torch.randperm(n, generator=g).to(cv.device)
            cv[r, :n], cc[r, :n] = cv[r, :n][p].clone(), cc[r, :n][p].clone()
        return cv, cc, cnt

    monkeypatch.setattr(ops, "indexer_prefill_candidates", shuffled)
    st = {}
    idx = indexer_topk_prefill_fused(q8, w, k8, ks, rs, re, topk, topk_fn=topk_rows_reference, sample_stride=4,
                                     cap=512, stats=st)
    logits = indexer_logits(q8, w, k8, ks, rs, re)
    kth = torch.sort(logits, 1, descending=True).values[:, topk - 1]
    assert ((logits == kth[:, None]).sum(1) > 100).all() and st["fallback_rows"] == 0
    ref = topk_rows_reference(logits, topk, row_start=rs, row_end=re)
    assert torch.equal(idx.sort(1).values.cpu(), ref.sort(1).values.cpu())


@pytest.mark.gpu
@pytest.mark.parametrize("h", [32, 64])
def test_gpu_atomic_candidates_match_reference(h):
    """On the GPU (inline-asm appends, one lane per replicated entry): the reference's counts and lists (as sets)
    at a realistic size with long causal windows, overflowing rows included, NaN-poisoned outputs."""
    t, s, cap = 1024, 20000, 2048
    q8, w, k8, ks = _inputs(t, s, h, "cuda", seed=h)
    re = torch.arange(s - t + 1, s + 1, dtype=torch.int32, device="cuda")
    rs = (torch.arange(t, device="cuda", dtype=torch.int32) * 7) % 900
    logits = indexer_logits(q8, w, k8, ks, rs, re)
    thr = torch.where(torch.isfinite(logits), logits, float("nan")).nanquantile(0.95, dim=1)
    thr[:8] = float("-inf")  # overflowing rows
    out = (poisoned((t, cap), torch.float32, "cuda"), poisoned((t, cap), torch.int32, "cuda"),
           poisoned((t, 2), torch.int32, "cuda"))
    vals, cols, counts = indexer_prefill_candidates(q8, w, k8, ks, rs, re, thr, cap, out=out)
    assert bool((counts[:8, 0] > cap).all()) and bool((counts[8:, 0] <= cap).all())
    _check_lists(vals, cols, counts, logits, thr, cap, poison=True)
