"""Candidate pools wider than topk_rows' MAX_K (``topk_pool_rows``): index sets against the reference on both
paths (one-launch, decode), fresh random and tied rows, ragged windows, sampled rows, NaN / -inf, -1 padding,
NaN-poisoned buffers; the one-launch path's order the same on a second call; bad input."""
import pytest
import torch

from indexcache.kernels.topk import (MAX_K, MAX_POOL, plan_launches, pool_scratch_bytes_per_row, topk_pool_rows,
                                    topk_rows_reference)
from tests.helpers import count_allocations, poison_torch_empty


@pytest.fixture(autouse=True)
def _poison_empty(monkeypatch):
    """Every buffer the kernels allocate (output, state, scratch) starts as NaN / -7777."""
    poison_torch_empty(monkeypatch)


def _check(x, c, again=True, **kw):
    """``again``: a second call gives the same order (the one-launch path; the decode path's atomics leave it
    open, and no caller depends on it: re-rank layers break ties by position)."""
    out = topk_pool_rows(x, c, **kw)
    ref = topk_rows_reference(x, c, **{n: kw[n] for n in ("row_start", "row_end") if n in kw})
    assert out.shape == (x.shape[0], c) and out.dtype == torch.int32
    for o, e in zip(out.cpu(), ref.cpu()):
        v = o[o >= 0]
        assert (o[: v.numel()] >= 0).all() and (o[v.numel():] == -1).all()   # -1 only as trailing padding
        assert torch.equal(v.sort().values, e[e >= 0].sort().values)        # the tie rule makes sets unique
    one = kw.get("_path", "one" if x.shape[0] > 64 else "decode") == "one"
    if again and one:
        assert torch.equal(topk_pool_rows(x, c, **kw), out)                 # the same order again
    return out


@pytest.mark.parametrize("path", ["one", "decode"])
def test_pool_wider_than_max_k_ragged(path, device):
    torch.manual_seed(31)
    R, N, c = 3, 5000, MAX_K + 300
    x = torch.randn(R, N, device=device)
    x[0, 100:200] = float("nan")
    x[1, 7] = float("-inf")
    start = torch.tensor([0, 3, 900], dtype=torch.int32, device=device)
    end = torch.tensor([5000, 4999, 2100], dtype=torch.int32, device=device)  # row 2: fewer than c entries
    out = _check(x, c, row_start=start, row_end=end, _path=path)
    assert int((out[2] >= 0).sum()) == 1200


@pytest.mark.parametrize("path", ["one", "decode"])
def test_pool_ties_take_lower_columns(path, device):
    torch.manual_seed(32)
    x = (torch.rand(2, 3000, device=device) * 6).round()   # ~500 entries per value: ties at the threshold
    _check(x, 700, _path=path)


def test_pool_sampled_rows(device):
    """Rows longer than the candidate capacity take the sampled threshold of the one-launch path."""
    torch.manual_seed(33)
    x = torch.randn(4, 3001, device=device) * 3
    _check(x, 40, _path="one", _cap=256)


def test_default_paths_by_row_count(device):
    torch.manual_seed(34)
    _check(torch.randn(2, 700, device=device), 300)            # decode path
    _check(torch.randn(65, 120, device=device), 50, again=False)  # one-launch path


def test_scratch_bound_covers_the_one_launch_allocations(monkeypatch):
    """``pool_scratch_bytes_per_row`` (the F layers' chunk budget) bounds what a call of more than 64 rows
    allocates per row."""
    allocated = count_allocations(monkeypatch)
    R = 65
    for c, n in ((MAX_K + 8, 6000), (300, 5000)):
        x = torch.randn(R, n)
        allocated.clear()
        plan_launches(x, c, _path="one")  # topk_pool_rows' one-launch path: these buffers, then its launches
        assert 0 < sum(allocated) <= R * pool_scratch_bytes_per_row(c, n), (c, n, allocated)


def test_bad_arguments():
    x = torch.randn(2, 100)
    with pytest.raises(ValueError, match="c must be"):
        topk_pool_rows(x, MAX_POOL + 1)
    with pytest.raises(ValueError, match="c must be"):
        topk_pool_rows(x, 0)
    with pytest.raises(ValueError, match="_path must be"):
        topk_pool_rows(x, 4, _path="scan")


@pytest.mark.gpu
@pytest.mark.parametrize("rows", [1, 100], ids=["decode-path", "one-launch-path"])
def test_pool_of_8192_over_200k_on_gpu(rows):
    torch.manual_seed(35)
    x = torch.randn(rows, 200_000, device="cuda")
    end = torch.randint(150_000, 200_001, (rows,), device="cuda", dtype=torch.int32)
    _check(x, 8192, row_end=end)
