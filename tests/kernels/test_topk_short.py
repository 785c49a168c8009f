"""The re-rank pool's top-k with its slot gather (``topk_slots``, one program per row of <= MAX_SHORT candidates):
Triton (interpreter on CPU, small rows and tiles so the histogram rounds and the write tiles repeat) against the
reference on fresh random pools: ragged pools with -1 holes and padding, rows with fewer than k valid entries,
NaN / -inf / -0.0, heavy ties at the threshold (by column, or by tie ids), NaN-poisoned (-7777) outputs; checked both as whole outputs (pool
order) and against ``topk_rows_reference``'s sets and scores; bad input; the GPU at the real widths."""
import pytest
import torch

from indexcache.kernels.candidate_topk import MAX_SHORT, topk_slots, topk_slots_reference
from indexcache.kernels.topk import topk_rows_reference
from tests.helpers import poisoned


def _pools(rows, c, seed, device="cpu", ties=False):
    """Logits and slot ids of ragged candidate pools: row r holds a random number of distinct slots (row 1 none,
    row 2 fewer than a handful) with -1 holes, -inf logits where the slot is -1; a NaN, a -0.0 / +0.0 pair.
    ``ties``: logits rounded to a few values, so thresholds fall inside runs of equal logits."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, c, generator=g) * 3
    if ties:
        x = x.round()
    slots = torch.randperm(64 * c * rows + 7, generator=g)[: rows * c].view(rows, c).to(torch.int32)
    cand = slots.clone()
    for r in range(rows):
        m = 0 if r == 1 else 5 if r == 2 else int(torch.randint(c // 2, c + 1, (1,), generator=g))
        cand[r, m:] = -1
        holes = torch.randint(0, c, (c // 10,), generator=g)
        cand[r, holes] = -1
    if rows > 3 and c > 8:
        cand[3, 2:5] = slots[3, 2:5]
    x[cand < 0] = float("-inf")
    if rows > 3 and c > 8:
        x[3, 2] = float("nan")
        x[3, 3], x[3, 4] = -0.0, 0.0      # equal values: the lower column first
    return x.to(device), cand.to(device)


def _check(x, cand, k, **kw):
    got = topk_slots(x, cand, k, **kw)
    ref = topk_slots_reference(x, cand, k)
    assert got.shape == (x.shape[0], k) and got.dtype == torch.int32
    assert torch.equal(got, ref)
    # and against topk_rows' selection itself: the same slot sets, the scores of the selection
    cols = topk_rows_reference(x, k).cpu().long()
    xc, cc, g = x.float().cpu(), cand.cpu().long(), got.cpu()
    for r in range(x.shape[0]):
        sel = cols[r][cols[r] >= 0]
        n = sel.numel()
        assert bool((g[r, n:] == -1).all()) and bool((g[r, :n] >= 0).all())   # -1 only as trailing padding
        assert sorted(g[r, :n].tolist()) == sorted(cc[r, sel].tolist())
        pos = {int(s): j for j, s in enumerate(cc[r]) if s >= 0}
        js = [pos[int(s)] for s in g[r, :n]]
        assert js == sorted(js)                                                # pool order
        if n:
            assert torch.equal(xc[r, js].sort().values, xc[r, sel].sort().values)
    return got


@pytest.mark.parametrize("rows,c,k,lb,pb", [(5, 64, 16, 4, 16), (6, 600, 64, 2, 128), (4, 333, 40, 6, 64),
                                            (5, 200, 300, 3, 32)],
                         ids=["one-tile", "many-rounds", "64-bins", "k-above-pool"])
def test_random_pools_match_reference(rows, c, k, lb, pb):
    x, cand = _pools(rows, c, seed=c + k)
    out = _check(x, cand, k, config=dict(LB=lb, PB=pb))
    assert int((out[1] >= 0).sum()) == 0 and int((out[2] >= 0).sum()) <= 5     # no valid / fewer than k


@pytest.mark.parametrize("rows,c,k,lb", [(6, 500, 64, 4), (5, 130, 33, 2), (4, 96, 95, 3)])
def test_heavy_ties_take_lowest_columns(rows, c, k, lb):
    x, cand = _pools(rows, c, seed=7 * c + k, ties=True)
    # a row of one value and a row of two, for the degenerate ranges
    x[0] = torch.where(cand[0] >= 0, 1.5, float("-inf"))
    x[4 % rows] = torch.where(cand[4 % rows] >= 0, (torch.arange(c) % 2).float(), float("-inf"))
    _check(x, cand, k, config=dict(LB=lb, PB=32))


@pytest.mark.parametrize("rows,c,k,lb", [(6, 500, 64, 4), (5, 130, 33, 2), (4, 300, 299, 3)])
def test_ties_by_tie_ids(rows, c, k, lb):
    """``tie_ids`` (a re-rank layer's pool positions, in no particular order): ties go to the lower id, so the
    selection equals topk_slots without tie ids on the pool sorted by id (ties by j = by id), in pool order."""
    x, cand = _pools(rows, c, seed=3 * c + k, ties=True)
    x[0] = torch.where(cand[0] >= 0, 1.5, float("-inf"))           # one value: ties decide everything
    g = torch.Generator().manual_seed(c)
    ids = torch.stack([torch.randperm(10 * c, generator=g)[:c] for _ in range(rows)]).to(torch.int32)
    got = topk_slots(x, cand, k, tie_ids=ids, out=poisoned((rows, k), torch.int32, "cpu"), config=dict(LB=lb, PB=32))
    assert torch.equal(got, topk_slots_reference(x, cand, k, ids))
    order = ids.argsort(1)
    by_id = topk_slots_reference(x.gather(1, order), cand.gather(1, order.to(torch.int64)), k)
    assert torch.equal(got.sort(1).values, by_id.sort(1).values)
    if k < int((cand[0] >= 0).sum()):  # row 0 is all ties: the rule decides its set
        assert not torch.equal(got[0].sort().values, topk_slots_reference(x, cand, k)[0].sort().values)
    with pytest.raises(ValueError, match="tie_ids must be"):
        topk_slots(x, cand, k, tie_ids=ids[:, :5])


def test_out_buffer_int64_slots_and_strided_logits():
    """A poisoned out= is fully written; int64 slot ids and a strided logits view give the same result."""
    x, cand = _pools(4, 300, seed=11)
    wide = torch.randn(4, 320)
    wide[:, :300] = x
    out = poisoned((4, 50), torch.int32, "cpu")
    got = topk_slots(wide[:, :300], cand.long(), 50, out=out, config=dict(PB=64))
    assert got.data_ptr() == out.data_ptr()
    assert torch.equal(got, topk_slots_reference(x, cand, 50))


def test_half_precision_logits():
    x, cand = _pools(4, 257, seed=12, ties=True)
    _check(x.half(), cand, 30)


def test_bad_input_names_the_value():
    x, cand = _pools(2, 40, seed=0)
    with pytest.raises(ValueError, match="k must be a positive int, got 0"):
        topk_slots(x, cand, 0)
    with pytest.raises(ValueError, match=r"cand must be \[T, c\]=\(2, 40\)"):
        topk_slots(x, cand[:, :30], 4)
    with pytest.raises(ValueError, match="cand must be"):
        topk_slots(x, cand.float(), 4)
    with pytest.raises(ValueError, match=f"at most {MAX_SHORT} candidates, got {MAX_SHORT + 1}"):
        topk_slots(torch.zeros(1, MAX_SHORT + 1), torch.zeros(1, MAX_SHORT + 1, dtype=torch.int32), 4)
    with pytest.raises(ValueError, match="out must be"):
        topk_slots(x, cand, 4, out=torch.empty(2, 5, dtype=torch.int32))
    with pytest.raises(ValueError, match="logits must be"):
        topk_slots(x.double(), cand, 4)


@pytest.mark.gpu
@pytest.mark.parametrize("c", [4096, 8192, 16384])
@pytest.mark.parametrize("rows", [300, 3])
@pytest.mark.parametrize("ties", [False, True], ids=["random", "ties"])
def test_gpu_real_widths(c, rows, ties):
    x, cand = _pools(rows, c, seed=c + rows, device="cuda", ties=ties)
    got = topk_slots(x, cand, 2048, out=poisoned((rows, 2048), torch.int32, "cuda"))
    assert torch.equal(got, topk_slots_reference(x, cand, 2048))


@pytest.mark.gpu
@pytest.mark.parametrize("c", [4096, 8192, 16384])
def test_gpu_ties_by_tie_ids(c):
    x, cand = _pools(300, c, seed=c + 1, device="cuda", ties=True)
    g = torch.Generator().manual_seed(c)
    ids = torch.stack([torch.randperm(4 * c, generator=g)[:c] for _ in range(300)]).to(torch.int32).cuda()
    got = topk_slots(x, cand, 2048, tie_ids=ids, out=poisoned((300, 2048), torch.int32, "cuda"))
    assert torch.equal(got, topk_slots_reference(x, cand, 2048, ids))


@pytest.mark.gpu
@pytest.mark.parametrize("cfg", [dict(num_warps=4, PB=512), dict(num_warps=16, PB=2048), dict(LB=5), dict(LB=8)],
                         ids=["4-warps", "16-warps", "32-bins", "256-bins"])
def test_gpu_configs_and_cuda_graph(cfg):
    """Every config the benchmark tries selects the same; the launch replays in a CUDA graph (decode)."""
    x, cand = _pools(64, 8192, seed=len(str(cfg)), device="cuda", ties=True)
    ref = topk_slots_reference(x, cand, 2048)
    assert torch.equal(topk_slots(x, cand, 2048, config=cfg), ref)
    out = torch.empty(64, 2048, dtype=torch.int32, device="cuda")
    topk_slots(x, cand, 2048, out=out)       # compiled before the capture
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        topk_slots(x, cand, 2048, out=out)
    out.fill_(-7777)
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, ref)
