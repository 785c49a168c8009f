"""Exact top-k: index sets against the reference, the lower-column tie rule, -1 padding, adversarial buckets."""
import pytest
import torch

from indexcache.kernels.topk import topk_rows, topk_rows_reference
from tests.helpers import poisoned


@pytest.fixture(autouse=True)
def _poison_empty(monkeypatch):
    """Every buffer the kernels allocate (output, state, scratch) starts as NaN / -7777."""
    def empty(*shape, dtype=None, device=None, **kw):
        shape = tuple(shape[0]) if len(shape) == 1 and isinstance(shape[0], (tuple, list, torch.Size)) else shape
        return poisoned(shape, dtype or torch.get_default_dtype(), device or "cpu")

    monkeypatch.setattr(torch, "empty", empty)


def _sets_equal(out, ref):
    return torch.equal(out.sort(dim=1).values.cpu(), ref.sort(dim=1).values.cpu())


def _check(x, k, **kw):
    out = topk_rows(x, k, **kw)
    ref = topk_rows_reference(x, k, **{n: kw[n] for n in ("row_start", "row_end") if n in kw})
    assert out.shape == (x.shape[0], k) and out.dtype == torch.int32
    assert ((out >= -1) & (out < x.shape[1])).all()
    # -1 only as trailing padding, each valid id once
    for o in out.cpu():
        v = o[o >= 0]
        assert (o[: v.numel()] >= 0).all() and v.unique().numel() == v.numel()
    # the selected scores are the same multiset; with the tie rule the id sets are identical
    xs = x.float().cpu()
    vo = torch.gather(xs, 1, out.cpu().clamp(min=0).long()).masked_fill(out.cpu() < 0, float("-inf"))
    vr = torch.gather(xs, 1, ref.cpu().clamp(min=0).long()).masked_fill(ref.cpu() < 0, float("-inf"))
    assert torch.equal(vo.sort(dim=1).values, vr.sort(dim=1).values)
    assert _sets_equal(out, ref)
    return out


def test_random_ragged_rows(device):
    torch.manual_seed(1)
    R, N, k = 5, 3001, 64
    x = torch.randn(R, N, device=device) * 3
    start = torch.tensor([0, 17, 1000, 2990, 5], dtype=torch.int32, device=device)
    end = torch.tensor([3001, 2500, 1040, 3001, 5], dtype=torch.int32, device=device)  # 40 / 11 / 0 entries
    out = _check(x, k, row_start=start, row_end=end)
    assert (out[3, 11:] == -1).all() and (out[4] == -1).all()
    # ids respect the window
    for r in range(R):
        v = out[r][out[r] >= 0]
        assert ((v >= start[r]) & (v < end[r])).all()


def test_fp16_ties_and_whole_row_path(device):
    torch.manual_seed(2)
    # fp16 rounding of a narrow range makes many exact ties around the threshold; N <= sample size
    x = (torch.rand(3, 250, device=device) * 4).round().to(torch.float16)
    _check(x, 37)
    # longer fp16 rows take the sampled-bracket path
    x = (torch.randn(2, 4100, device=device) * 2).to(torch.float16)
    _check(x, 300)


def test_lower_column_wins_ties(device):
    R, N, k = 4, 2000, 50
    x = torch.randn(R, N, device=device)
    x[0] = 1.0                                  # all equal: the first k columns
    x[1, ::3] = 5.0                             # 667 equal maxima: the first k of them
    x[2] = float("-inf")                        # nothing valid
    x[2, 1500:1510] = 0.5
    x[3, 100:200] = float("nan")
    x[3, 300] = -0.0
    x[3, 301] = 0.0
    out = _check(x, k)
    assert torch.equal(out[0].sort().values.cpu(), torch.arange(k, dtype=torch.int32))
    assert torch.equal(out[1].sort().values.cpu(), torch.arange(0, 3 * k, 3, dtype=torch.int32))
    assert torch.equal(out[2, :10].sort().values.cpu(), torch.arange(1500, 1510, dtype=torch.int32))
    assert (out[2, 10:] == -1).all()
    assert not ((out[3] >= 100) & (out[3] < 200)).any()


def test_adversarial_shared_bucket_and_overflow(device):
    torch.manual_seed(3)
    N, k = 4500, 100
    # every value shares sign, exponent and the top 19 mantissa bits: one radix bucket holds the whole row
    base = torch.full((N,), 1.0)
    x = torch.stack([base + torch.randint(0, 16, (N,)).float() * 2.0**-23,
                     base + torch.randint(0, 3, (N,)).float() * 2.0**-23]).to(device)
    _check(x, k)
    # tiny scratch capacity forces the exact fallback (a compaction kernel with a bounded buffer would drop)
    _check(x, k, _cap=64)
    _check(torch.randn(2, N, device=device), k, _cap=64)


def test_sampling_misses_clustered_maxima(device):
    torch.manual_seed(4)
    N, k = 7000, 200
    x = torch.randn(2, N, device=device)
    x[0, 3000:3200] += 50.0          # all top-k in one short run the sample may miss
    x[1] = torch.arange(N, device=device).float()  # sorted row
    _check(x, k)
    _check(x, k, row_start=torch.tensor([2990, 0], dtype=torch.int32, device=device),
           row_end=torch.tensor([3500, 4000], dtype=torch.int32, device=device))


def test_sorted_flag_matches_reference_order(device):
    torch.manual_seed(5)
    x = (torch.randn(2, 900, device=device) * 2).round()
    out = topk_rows(x, 120, sorted=True)
    assert torch.equal(out.cpu(), topk_rows_reference(x, 120).cpu())


def test_bad_arguments():
    x = torch.randn(2, 100)
    with pytest.raises(ValueError, match="k must"):
        topk_rows(x, 0)
    with pytest.raises(ValueError, match="k must"):
        topk_rows(x, 5000)
    with pytest.raises(ValueError, match="2-D"):
        topk_rows(torch.randn(100), 4)
    with pytest.raises(ValueError, match="dtype"):
        topk_rows(x.double(), 4)
    with pytest.raises(ValueError, match="row_end"):
        topk_rows(x, 4, row_end=torch.tensor([1, 2, 3], dtype=torch.int32))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_long_rows(dtype):
    torch.manual_seed(6)
    R, N, k = 8, 200_000, 2048
    x = torch.randn(R, N, device="cuda").to(dtype)
    ends = torch.tensor([N, N - 7, 150_001, 2047, 2048, 3000, N, 100_000], dtype=torch.int32, device="cuda")
    x[6, :] = 0.25                                 # all ties
    x[7, 50_000:52_500] = 1e4                      # clustered maxima
    _check(x, k, row_end=ends)
    _check(torch.randn(300, 70_000, device="cuda").to(dtype), k)
    _check(torch.randn(3, 200_000, device="cuda"), 4096)
