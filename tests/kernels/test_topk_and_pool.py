"""An F layer's top-k and its candidate pool from one read of the row (``topk_and_pool_rows``: the one-launch
kernel selects the wider, then the narrower from the same candidates): both parts' index sets against the
reference (ties to the lower column), on fresh random rows with ragged windows, NaN / -inf / -0.0, heavy ties at
both thresholds, sampled rows (rows longer than the candidate capacity), rows that fall back to the whole row
(more ties than the capacity), rows with fewer valid entries than either width, the pool narrower than the
top-k, NaN-poisoned buffers; bad input; the GPU at 200K."""
import pytest
import torch

from indexcache.kernels.topk import (MAX_K, MAX_POOL, topk_and_pool_rows, topk_and_pool_scratch_bytes_per_row,
                                    topk_rows_reference)
from tests.helpers import count_allocations, poison_torch_empty


@pytest.fixture(autouse=True)
def _poison_empty(monkeypatch):
    """Every buffer the kernel allocates (output, counters, scratch) starts as NaN / -7777."""
    poison_torch_empty(monkeypatch)


def _rows(R, N, seed, device, ties=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(R, N, generator=g) * 3
    if ties:
        x = x.round()                    # a few values: long runs of equal logits at both thresholds
    x[0, 3], x[0, 5] = -0.0, 0.0
    x[min(1, R - 1), 100:140] = float("nan")
    x[R - 1, 11] = float("-inf")
    start = torch.randint(0, N // 4, (R,), generator=g, dtype=torch.int32)
    end = torch.randint(N // 2, N + 1, (R,), generator=g, dtype=torch.int32)
    return x.to(device), start.to(device), end.to(device)


def _check(x, k, c, **kw):
    out = topk_and_pool_rows(x, k, c, **kw)
    assert out.shape == (x.shape[0], k + c) and out.dtype == torch.int32
    win = {n: kw[n] for n in ("row_start", "row_end") if n in kw}
    for part, n in ((out[:, :k], k), (out[:, k:], c)):
        ref = topk_rows_reference(x, n, **win).cpu()
        for r, (o, e) in enumerate(zip(part.cpu(), ref)):
            v = o[o >= 0]
            assert (o[: v.numel()] >= 0).all() and (o[v.numel():] == -1).all(), (n, r)   # -1 only trailing
            assert torch.equal(v.sort().values, e[e >= 0].sort().values), (n, r)        # the unique set
    return out


@pytest.mark.parametrize("k,c", [(40, 160), (64, 64), (200, 50)], ids=["pool-4k", "equal", "pool-narrower"])
@pytest.mark.parametrize("ties", [False, True], ids=["random", "ties"])
def test_both_parts_are_the_reference_sets(k, c, ties, device):
    x, start, end = _rows(5, 3000, seed=k + c + ties, device=device, ties=ties)
    _check(x, k, c, row_start=start, row_end=end)


@pytest.mark.parametrize("ties", [False, True], ids=["random", "ties"])
def test_sampled_rows(ties, device):
    """Rows longer than the capacity take the sampled threshold; with ties some overflow it and redo the whole row."""
    x, start, end = _rows(4, 4001, seed=7 + ties, device=device, ties=ties)
    _check(x, 30, 120, row_start=start, row_end=end, _cap=512)


def test_rows_with_fewer_valid_entries_than_either_width(device):
    torch.manual_seed(8)
    x = torch.randn(3, 600, device=device)
    start = torch.tensor([0, 500, 590], dtype=torch.int32, device=device)
    end = torch.tensor([600, 560, 590], dtype=torch.int32, device=device)     # 600 / 60 / 0 valid
    out = _check(x, 100, 400, row_start=start, row_end=end)
    assert int((out[1, :100] >= 0).sum()) == 60 and int((out[1, 100:] >= 0).sum()) == 60
    assert bool((out[2] == -1).all())


def test_widths_up_to_the_limits(device):
    torch.manual_seed(9)
    x = torch.randn(2, MAX_POOL + 700, device=device)
    _check(x, MAX_K, MAX_POOL, row_end=torch.tensor([MAX_POOL + 700, 9000], dtype=torch.int32, device=device))


def test_scratch_bound_covers_the_allocations(monkeypatch):
    allocated = count_allocations(monkeypatch)
    R, n = 65, 6000
    for k, c in ((40, MAX_K + 8), (300, 100)):
        allocated.clear()
        topk_and_pool_rows(torch.randn(R, n), k, c)
        assert 0 < sum(allocated) <= R * topk_and_pool_scratch_bytes_per_row(k, c, n), (k, c, allocated)


def test_bad_arguments():
    x = torch.randn(2, 100)
    with pytest.raises(ValueError, match="c must be"):
        topk_and_pool_rows(x, 4, MAX_POOL + 1)
    with pytest.raises(ValueError, match="c must be"):
        topk_and_pool_rows(x, 4, 0)
    with pytest.raises(ValueError, match="k must be"):
        topk_and_pool_rows(x, MAX_K + 1, 8)
    with pytest.raises(ValueError, match="logits must be 2-D"):
        topk_and_pool_rows(x[0], 4, 8)


@pytest.mark.gpu
def test_topk_2048_and_pool_4096_over_200k_on_gpu():
    torch.manual_seed(35)
    x = torch.randn(100, 200_000, device="cuda")
    end = torch.randint(150_000, 200_001, (100,), device="cuda", dtype=torch.int32)
    _check(x, 2048, 4096, row_end=end)
