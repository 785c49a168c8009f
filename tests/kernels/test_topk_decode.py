"""Decode top-k (one row over many programs): index sets against the reference, the lower-column tie rule,
-1 padding, the workspace left zeroed for the next call (CUDA-graph replay)."""
import pytest
import torch

from indexcache.kernels.topk import (DecodeTopkWorkspace, plan_decode_launches, topk_rows, topk_rows_decode,
                                     topk_rows_reference)
from tests.helpers import poison_torch_empty
from tests.kernels.test_topk import long_hard_rows


@pytest.fixture(autouse=True)
def _poison_empty(monkeypatch):
    """Every buffer the kernels allocate with torch.empty (output, state, lists) starts as NaN / -7777."""
    poison_torch_empty(monkeypatch)


def _check(x, k, ws=None, **kw):
    out = topk_rows_decode(x, k, workspace=ws, **kw)
    win = {n: kw[n] for n in ("row_start", "row_end") if n in kw}
    ref = topk_rows_reference(x, k, **win)
    assert out.shape == (x.shape[0], k) and out.dtype == torch.int32
    assert ((out >= -1) & (out < x.shape[1])).all()
    for o in out.cpu():     # -1 only as trailing padding, each valid id once
        v = o[o >= 0]
        assert (o[: v.numel()] >= 0).all() and v.unique().numel() == v.numel()
    xs = x.float().cpu()    # the same multiset of scores, and (tie rule) the same id sets
    vo = torch.gather(xs, 1, out.cpu().clamp(min=0).long()).masked_fill(out.cpu() < 0, float("-inf"))
    vr = torch.gather(xs, 1, ref.cpu().clamp(min=0).long()).masked_fill(ref.cpu() < 0, float("-inf"))
    assert torch.equal(vo.sort(dim=1).values, vr.sort(dim=1).values)
    assert torch.equal(out.sort(dim=1).values.cpu(), ref.sort(dim=1).values.cpu())
    if ws is not None:      # left ready for the next call
        assert not ws.hist.any() and not ws.ctr.any()
    return out


def test_random_ragged_rows_masked_tails(device):
    torch.manual_seed(1)
    R, N, k = 6, 3001, 64
    x = torch.randn(R, N, device=device) * 3
    x[:, 2600:] = 1e6                            # huge values past row_end must never be taken
    x[1, 100:300] = float("nan")
    x[1, 300:400] = float("-inf")
    start = torch.tensor([0, 17, 1000, 2590, 5, 0], dtype=torch.int32, device=device)
    end = torch.tensor([2600, 2500, 1040, 2600, 5, 64], dtype=torch.int32, device=device)  # 40 / 10 / 0 / 64
    out = _check(x, k, row_start=start, row_end=end)
    assert (out[3, 10:] == -1).all() and (out[4] == -1).all() and (out[5] >= 0).all()
    for r in range(R):
        v = out[r][out[r] >= 0]
        assert ((v >= start[r]) & (v < end[r])).all()


def test_workspace_reused_across_calls(device):
    torch.manual_seed(2)
    R, N, k = 3, 4000, 200
    ws = DecodeTopkWorkspace.new(R, N, device)
    for i in range(3):                           # fresh inputs each call, shorter rows in the same workspace
        n = N - 700 * i
        ends = torch.tensor([n, n - 1000, 150], dtype=torch.int32, device=device)
        _check(torch.randn(R, n, device=device) + i, k, ws, row_end=ends)
    with pytest.raises(ValueError, match="workspace is for 3 rows"):
        topk_rows_decode(torch.randn(2, N, device=device), k, workspace=ws)
    with pytest.raises(ValueError, match="workspace is for 3 rows of <= 4000"):
        topk_rows_decode(torch.randn(R, N + 1, device=device), k, workspace=ws)


def test_bounds_outside_the_row_are_clamped(device):
    """The kernels clamp the window to [0, N] themselves (int64 bounds, negative, past the end, start > end)."""
    torch.manual_seed(12)
    x = torch.randn(4, 900, device=device)
    start = torch.tensor([-50, 0, 850, 600], dtype=torch.int64, device=device)
    end = torch.tensor([400, 5000, 2000, 500], dtype=torch.int64, device=device)
    out = _check(x, 100, DecodeTopkWorkspace.new(4, 900, device), row_start=start, row_end=end)
    assert (out[2, :50] >= 850).all() and (out[2, 50:] == -1).all() and (out[3] == -1).all()


def test_head_of_a_larger_workspace(device):
    """One workspace for the largest batch: calls of fewer rows and shorter rows run on its first rows (views of
    the same memory) and leave every row zeroed; asking for more rows than it holds is an error."""
    torch.manual_seed(11)
    ws = DecodeTopkWorkspace.new(5, 3000, device)
    for R, n in ((2, 3000), (5, 1200), (1, 2999), (3, 700)):
        head = ws.head(R)
        assert head.rows == R and head.n == 3000 and head.hist.data_ptr() == ws.hist.data_ptr()
        ends = torch.tensor([n - 37 * i for i in range(R)], dtype=torch.int32, device=device)
        x = torch.randn(R, n, device=device) * 2
        x[0, n // 2:] = float("nan")
        _check(x, 150, head, row_end=ends)
        assert not ws.hist.any() and not ws.ctr.any()
    with pytest.raises(ValueError, match=r"rows must be in \[1, 5\], got 6"):
        ws.head(6)


def test_thousands_of_ties_at_the_threshold(device):
    torch.manual_seed(3)
    R, N, k = 4, 6000, 300
    x = torch.randint(0, 6, (R, N), device=device).float()   # ~1000 equal values per level
    x[1] = 1.0                                   # all equal: the first k columns
    x[2, ::2] = 7.0                              # 3000 equal maxima: the first k of them
    x[3, 10:20] = 9.0                            # ten above, the rest from a tie level
    ws = DecodeTopkWorkspace.new(R, N, device)
    out = _check(x, k, ws)
    assert torch.equal(out[1].sort().values.cpu(), torch.arange(k, dtype=torch.int32))
    assert torch.equal(out[2].sort().values.cpu(), torch.arange(0, 2 * k, 2, dtype=torch.int32))


def test_tens_of_ties_ranked_by_counting(device):
    torch.manual_seed(9)
    x = torch.randn(2, 3000, device=device) * 3
    for r in range(2):                           # 40 copies of the 50th largest value: ranked with the rest
        v = x[r].sort(descending=True).values[50]
        x[r, torch.randperm(3000, device=device)[:40]] = v
    ws = DecodeTopkWorkspace.new(2, 3000, device)
    _check(x, 64, ws)
    assert ((ws.state[:, 6] > 16) & (ws.state[:, 6] <= 64)).all()   # several counting tiles in the final select

def test_narrow_ranges_reach_the_later_digits(device):
    torch.manual_seed(4)
    R, N, k = 4, 5000, 257
    x = torch.empty(R, N, device=device)
    x[0] = 1.0 + torch.rand(N, device=device) * 1e-3     # one first-digit bin: the second digit decides
    x[1] = 1.0 + torch.rand(N, device=device) * 1e-5     # one second-digit bin too: the final select decides
    x[2] = -3.0 - torch.rand(N, device=device) * 1e-4    # negative keys
    x[3] = torch.randn(N, device=device) * 1e-30         # tiny values, -0.0 and +0.0 equal
    x[3, :50] = -0.0
    x[3, 50:100] = 0.0
    _check(x, k, DecodeTopkWorkspace.new(R, N, device))


def _keys(x):
    """The kernels' order-preserving int32 key of fp32 values (-0.0 as +0.0); None where never selected."""
    x = torch.where(x == 0, torch.zeros_like(x), x)
    b = x.view(torch.int32)
    return torch.where(b >= 0, b, b ^ 0x7FFFFFFF).long(), ~torch.isnan(x) & (x != float("-inf"))


def _threshold_bin(h, m):
    """(B, count above B, count in B) as the kernels define them: B = -1 when m takes nothing or everything."""
    if m <= 0 or m >= int(h.sum()):
        return -1, int(h.sum()), 0
    ge = h.flip(0).cumsum(0).flip(0)
    B = int((ge >= m).nonzero().max())
    return B, int(h[B + 1:].sum()), int(h[B])


def test_threshold_bins_match_torch(device):
    """The hist and filter1 launches alone: the per-row state (m, B1, above1, n1, B2, above, n2) against torch
    histograms of the two digits, on rows whose blocks count through each histogram window (top, bottom, mean)
    and the per-entry atomics, with the threshold bin in each of them."""
    torch.manual_seed(10)
    R, N, k = 8, 4000, 300
    x = torch.randn(R, N, device=device) * 3     # wide bell: top and bottom windows, per-entry atomics between
    x[1] = 5.0 + torch.rand(N, device=device) * 1e-2          # narrow: one digit-1 bin, digit 2 spread
    x[2] = (torch.randn(N, device=device) * 2).round()        # ties: a heavy bin at 0.0 (the mean window)
    x[3, ::2] = 1e-20 * torch.rand(N // 2, device=device)     # threshold between the windows
    x[3, 1::40] = 1e20
    x[4] = -1.0 - torch.rand(N, device=device) * 1e-2         # threshold in the bottom window
    x[4, ::37] = 1e20
    x[4, ::3] = float("nan")
    x[5] = 1.5625 + torch.randn(N, device=device) * 1e-3      # one digit-1 bin, a digit-2 bell: threshold in
    x[6] = 1e-10 * (1 + 0.1 * torch.randn(N, device=device))  # its middle (row end 1000 = k / 0.3); row 6: a
    x[6, ::25] = 1e20                                         # digit-1 cluster with far entries on both sides
    x[6, 1::70] = -1e20                                       # that centre the mean on it
    x[7] = float("-inf")
    ends = torch.tensor([N, N - 5, N, 3001, 2000, 1000, N, N], dtype=torch.int32, device=device)
    _check_state(x, k, ends)


def test_threshold_bins_in_digit_2_windows(device):
    """Rows inside one digit-1 bin with their digit 2 spread over thousands of bins: list1's blocks count digit 2
    through the windows and per-entry atomics, with the threshold bin among the per-entry bins (top 7%), at the
    block means (about half the row), near the block bottoms (almost all of it) and in a bin of 1000 ties (whose
    final select takes the histogram rounds)."""
    torch.manual_seed(13)
    R, N, k = 4, 3000, 200
    x = 2.0 + torch.rand(R, N, device=device) * 5.9          # [2, 7.9): one digit-1 bin, ~3000 digit-2 bins
    x[3, ::3] = 7.7                                          # ~70 above 1000 ties: the threshold among them
    ends = torch.tensor([N, 400, 205, N], dtype=torch.int32, device=device)
    _check_state(x, k, ends)
    ws = DecodeTopkWorkspace.new(R, N, device)
    _check(x, k, ws, row_end=ends)
    assert int(ws.state[3, 6]) >= 1000           # list2 of the tie row: past TB, the histogram rounds


def _check_state(x, k, ends):
    """Run the hist and filter1 launches and compare the per-row state with torch histograms of the digits."""
    R, N = x.shape
    ws = DecodeTopkWorkspace.new(R, N, x.device)
    stages, _ = plan_decode_launches(x, k, row_end=ends, workspace=ws)
    for _, launch in stages[:2]:                 # hist, filter1
        launch()
        assert not ws.hist.any() and not ws.ctr.any()
    for r in range(R):
        key, ok = _keys(x[r, : int(ends[r])].cpu())
        key = key[ok]
        d1 = (key >> 24) + 128                   # digit 1: key bits 31..24, digit 2: bits 23..12
        m = min(key.numel(), k)
        B1, above1, n1 = _threshold_bin(torch.bincount(d1, minlength=256), m)
        B2, above2, n2 = _threshold_bin(torch.bincount((key[d1 == B1] >> 12) & 0xFFF, minlength=4096), m - above1)
        assert ws.state[r, :7].tolist() == [m, B1, above1, n1, B2, above1 + above2, n2], r


def test_rows_shorter_than_k_and_empty(device):
    torch.manual_seed(5)
    x = torch.randn(3, 700, device=device)
    x[1, 100:] = float("nan")                    # 100 valid
    x[2] = float("-inf")                         # none valid
    out = _check(x, 256)
    assert (out[0, :] >= 0).all() and (out[1, 100:] == -1).all() and (out[2] == -1).all()
    out = _check(torch.randn(2, 50, device=device), 64)     # N < k
    assert (out[:, 50:] == -1).all()
    assert (topk_rows_decode(torch.randn(2, 0, device=device), 8) == -1).all()


def test_fp16_and_single_program_slices(device):
    torch.manual_seed(6)
    x = (torch.randn(3, 2500, device=device) * 2).to(torch.float16)   # fp16 rounding: many ties
    _check(x, 333)
    _check(x, 333, _slice=4096)                  # one program per row
    _check(x, 333, _slice=128)                   # many programs per row


def test_matches_topk_rows(device):
    torch.manual_seed(7)
    x = torch.randn(2, 4097, device=device)
    a = topk_rows_decode(x, 100)
    b = topk_rows(x, 100)
    assert torch.equal(a.sort(dim=1).values.cpu(), b.sort(dim=1).values.cpu())


def test_bad_arguments():
    x = torch.randn(2, 100)
    with pytest.raises(ValueError, match="k must be"):
        topk_rows_decode(x, 0)
    with pytest.raises(ValueError, match="logits must be 2-D"):
        topk_rows_decode(x[0], 4)
    with pytest.raises(ValueError, match="rows and n must be >= 1"):
        DecodeTopkWorkspace.new(0, 100, "cpu")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_long_rows_graph_replay(dtype):
    torch.manual_seed(8)
    x, ends = long_hard_rows(dtype)
    (R, N), k = x.shape, 2048
    x[5, :] = (x[5, :].float() * 4).round().to(dtype)   # thousands of ties at the threshold
    ws = DecodeTopkWorkspace.new(R, N, "cuda")
    _check(x, k, ws, row_end=ends)
    for n in (64_000, 1_000_000):
        _check(torch.randn(1, n, device="cuda").to(dtype), k)
    # replayed in a CUDA graph on new inputs, with the same workspace
    xs = torch.randn(4, N, device="cuda").to(dtype)
    ws4 = DecodeTopkWorkspace.new(4, N, "cuda")
    topk_rows_decode(xs, k, workspace=ws4)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = topk_rows_decode(xs, k, workspace=ws4)
    for i in range(3):
        xs.copy_(torch.randn(4, N, device="cuda").to(dtype) + i)
        g.replay()
        torch.cuda.synchronize()
        ref = topk_rows_reference(xs, k)
        assert torch.equal(out.sort(dim=1).values, ref.sort(dim=1).values)
    assert not ws4.hist.any() and not ws4.ctr.any()
