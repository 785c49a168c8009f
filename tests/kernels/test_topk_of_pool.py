"""An F layer's top-k taken from its own candidate pool (``topk_of_pool``: ``topk_slots``' kernel gathering
logits[r, pool[r, j]] from the wide row, ties to the lower column id): Triton (interpreter on CPU, small tiles so
the histogram rounds and the write tiles repeat) against the reference on fresh random rows, pools in shuffled
order (the pool kernel's order is not by column), heavy ties where the threshold's tie group is larger than the
rest to take (the second select by id), -1 holes and ids past the row, NaN / -inf / -0.0, NaN-poisoned outputs;
and the property the engine relies on: from ``topk_pool_rows``' pool it is ``topk_rows``' set; the GPU."""
import pytest
import torch

from indexcache.kernels.candidate_topk import MAX_SHORT, topk_of_pool, topk_of_pool_reference
from indexcache.kernels.topk import topk_pool_rows, topk_rows, topk_rows_reference
from tests.helpers import poisoned


def _rows(rows, L, seed, device="cpu", ties=False):
    """Wide logits with causal row ends (row r valid below ends[r]), NaN and -0.0 / +0.0 sprinkled in; ``ties``:
    rounded to a few values, so thresholds fall inside long runs of equal logits."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, L, generator=g) * 2
    if ties:
        x = x.round()
    x[0, 3], x[0, 5] = -0.0, 0.0
    x[1, 7] = float("nan")
    x[rows - 1, 11] = float("-inf")
    ends = torch.randint(L // 3, L + 1, (rows,), generator=g)
    ends[-1] = L
    return x.to(device), ends.to(device)


def _shuffled(pool, seed):
    """The pool in a random order per row, its -1 padding kept in place: the kernel must not rely on the order."""
    g = torch.Generator().manual_seed(seed)
    out = pool.clone()
    for r in range(pool.shape[0]):
        n = int((pool[r] >= 0).sum())
        out[r, :n] = pool[r, :n][torch.randperm(n, generator=g).to(pool.device)]
    return out


def _check_sets(got, x, ends, k):
    """The selection is topk_rows_reference's set under the causal mask: same ids, -1 only as trailing padding."""
    ref = topk_rows_reference(x, k, row_end=ends).cpu()
    g = got.cpu()
    for r in range(x.shape[0]):
        want = sorted(ref[r][ref[r] >= 0].tolist())
        n = len(want)
        assert sorted(g[r, :n].tolist()) == want, f"row {r}"
        assert bool((g[r, n:] == -1).all())


@pytest.mark.parametrize("rows,L,c,k,lb,pb", [(5, 700, 128, 40, 4, 32), (4, 2000, 300, 64, 2, 64),
                                              (6, 900, 96, 95, 6, 16)], ids=["rounds", "2-bit-bins", "k-near-c"])
@pytest.mark.parametrize("ties", [False, True], ids=["random", "ties"])
def test_pool_of_topk_pool_rows_is_topk_rows(rows, L, c, k, lb, pb, ties):
    """topk_pool_rows' pool (interpreted kernel), shuffled: the top-k of it is exactly topk_rows' set, and the
    output equals the reference (pool order)."""
    x, ends = _rows(rows, L, seed=L + c + k + ties, ties=ties)
    pool = _shuffled(topk_pool_rows(x, c, row_end=ends), seed=k)
    got = topk_of_pool(x, pool, k, out=poisoned((rows, k), torch.int32, "cpu"), config=dict(LB=lb, PB=pb))
    assert got.dtype == torch.int32 and got.shape == (rows, k)
    assert torch.equal(got, topk_of_pool_reference(x, pool, k))
    _check_sets(got, x, ends, k)
    assert torch.equal(topk_of_pool_reference(x, pool, k).sort(1).values,
                       topk_rows_reference(x, k, row_end=ends).sort(1).values)


def test_ties_go_to_lower_ids_not_lower_pool_entries():
    """All of a row's pool ties: the k lowest ids win, wherever they sit in the pool."""
    x = torch.full((2, 64), 1.0)
    pool = torch.stack([torch.arange(63, -1, -1), torch.randperm(64, generator=torch.Generator().manual_seed(3))])
    got = topk_of_pool(x, pool.to(torch.int32), 10, config=dict(LB=3, PB=16))
    for r in range(2):
        assert sorted(got[r].tolist()) == list(range(10))
        js = [int((pool[r] == i).nonzero()) for i in got[r].tolist()]
        assert js == sorted(js)                                               # written in pool order
    assert torch.equal(got, topk_of_pool_reference(x, pool, 10))


def test_holes_ids_past_the_row_and_few_valid():
    """-1 holes and ids >= L are none; a row with fewer valid entries than k is -1 padded; int64 pools."""
    x, _ = _rows(4, 300, seed=5, ties=True)
    g = torch.Generator().manual_seed(9)
    pool = torch.stack([torch.randperm(300, generator=g)[:120] for _ in range(4)])
    pool[0, ::7] = -1
    pool[1, ::5] = 300 + torch.arange(0, 120, 5)        # past the row
    pool[2, 6:] = -1                                    # six candidates for k = 30
    pool[3] = -1
    got = topk_of_pool(x, pool, 30, config=dict(LB=4, PB=32))
    assert torch.equal(got, topk_of_pool_reference(x, pool, 30))
    assert int((got[2] >= 0).sum()) <= 6 and int((got[3] >= 0).sum()) == 0
    assert int((got[1] >= 300).sum()) == 0


def test_strided_logits_and_half_precision():
    x, ends = _rows(4, 500, seed=8, ties=True)
    wide = torch.randn(4, 520)
    wide[:, :500] = x
    pool = _shuffled(topk_rows(x, 100, row_end=ends), seed=1)
    got = topk_of_pool(wide[:, :500], pool, 33, config=dict(PB=32))
    assert torch.equal(got, topk_of_pool_reference(x, pool, 33))
    assert torch.equal(topk_of_pool(x.half(), pool, 33), topk_of_pool_reference(x.half(), pool, 33))


def test_bad_input_names_the_value():
    x, _ = _rows(2, 64, seed=0)
    pool = torch.zeros(2, 16, dtype=torch.int32)
    with pytest.raises(ValueError, match="k must be a positive int, got 0"):
        topk_of_pool(x, pool, 0)
    with pytest.raises(ValueError, match=r"pool must be \[R=2, c\]"):
        topk_of_pool(x, pool[:1], 4)
    with pytest.raises(ValueError, match="pool must be"):
        topk_of_pool(x, pool.float(), 4)
    with pytest.raises(ValueError, match=f"at most {MAX_SHORT} candidates, got {MAX_SHORT + 1}"):
        topk_of_pool(x, torch.zeros(2, MAX_SHORT + 1, dtype=torch.int32), 4)
    with pytest.raises(ValueError, match="logits must be"):
        topk_of_pool(x.double(), pool, 4)
    with pytest.raises(ValueError, match="out must be"):
        topk_of_pool(x, pool, 4, out=torch.empty(2, 5, dtype=torch.int32))


@pytest.mark.gpu
@pytest.mark.parametrize("c", [4096, 8192])
@pytest.mark.parametrize("ties", [False, True], ids=["random", "ties"])
def test_gpu_from_topk_pool_rows(c, ties):
    """At the engine's widths: 300 rows of a causal 40K-column block, the pool from topk_pool_rows (GPU kernel):
    the top-k of the pool is topk_rows' set, and the output equals the reference."""
    x, ends = _rows(300, 40_000, seed=c + ties, device="cuda", ties=ties)
    pool = topk_pool_rows(x, c, row_end=ends)
    got = topk_of_pool(x, pool, 2048, out=poisoned((300, 2048), torch.int32, "cuda"))
    assert torch.equal(got, topk_of_pool_reference(x, pool, 2048))
    assert torch.equal(got.sort(1).values, topk_rows(x, 2048, row_end=ends).sort(1).values)
