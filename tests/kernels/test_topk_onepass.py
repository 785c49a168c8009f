"""The one-launch prefill top-k (``topk_rows(..., _path="one")``, ``triton._topk1_kernel``): index sets against the
reference on fresh random rows, ragged and unaligned windows, masked tails, NaN / -inf / -0.0, thousands of ties
at the threshold, bad samples (whole-row select), -1 padding, NaN-poisoned buffers."""
import pytest
import torch

from indexcache.kernels._dispatch import use_triton
from indexcache.kernels.topk import bracket_stats, plan_launches, topk_rows, topk_rows_reference
from tests.helpers import poison_torch_empty
from tests.kernels.test_topk import _check, _variant_key, hard_rows, long_hard_rows


@pytest.fixture(autouse=True)
def _poison_empty(monkeypatch):
    """Every buffer the kernel allocates (output, counters, scratch) starts as NaN / -7777."""
    poison_torch_empty(monkeypatch)


def _check_one(x, k, **kw):
    """``_check`` on the one-pass path; returns (output, rows that took the whole-row select)."""
    stats = {}
    out = _check(x, k, _path="one", stats=stats, **kw)
    return out, bracket_stats(stats, k)[0]


def test_sampled_rows_ragged_unaligned(device):
    """Rows longer than CAP take the sampled threshold; odd row length (unaligned rows), windows starting and
    ending off the 16-byte grid, a window shorter than k, an empty one."""
    torch.manual_seed(21)
    R, N, k = 6, 3001, 40
    x = torch.randn(R, N, device=device) * 3
    start = torch.tensor([0, 17, 1003, 2990, 5, 1], dtype=torch.int32, device=device)
    end = torch.tensor([3001, 2999, 2500, 3001, 5, 2222], dtype=torch.int32, device=device)
    for cap in (None, 256):                    # None: every row fits CAP (no sample); 256: sampled rows
        out, fb = _check_one(x, k, _cap=cap, row_start=start, row_end=end)
        assert fb == 0
        assert (out[3, 11:] == -1).all() and (out[4] == -1).all()
        for r in range(R):
            v = out[r][out[r] >= 0]
            assert ((v >= start[r]) & (v < end[r])).all()
    # a view whose rows start 12 bytes past a 16-byte boundary, no windows
    _check(x[:, 3:], k, _path="one", _cap=256)


def test_ties_nan_inf_and_padding(device):
    """Thousands of equal maxima (lowest columns win), few distinct values (ties at the threshold), NaN, -inf,
    -0.0 == +0.0, a row of -inf with a few valid entries (padding), with and without the sample."""
    torch.manual_seed(22)
    R, N, k = 6, 2500, 100
    x = hard_rows(R, N, device)                         # row 1: 834 equal maxima, the first k of them
    x[5] = float("nan")
    x[5, 7:2000:13] = torch.randn(154, device=device)  # fewer valid entries than the sample expects
    for cap in (None, 256):
        out = _check(x, k, _path="one", _cap=cap)
        assert torch.equal(out[1].sort().values.cpu(), torch.arange(0, 3 * k, 3, dtype=torch.int32))
        assert (out[3, 10:] == -1).all()
    # zeros of both signs at the threshold
    z = torch.zeros(2, 700, device=device)
    z[0, ::2] = -0.0
    z[1, :50] = 1.0
    _check(z, 80, _path="one", _cap=128)


def test_bad_samples_select_whole_row(device):
    """A sample that misses clustered maxima (count >= lo below k) and a CAP the candidates overflow both send
    the row to the whole-row select; the result is still exact and the other rows are unaffected."""
    torch.manual_seed(23)
    N, k = 3000, 150
    x = torch.randn(4, N, device=device)
    x[0, :2900] = float("-inf")            # 100 valid entries: the candidates cannot reach k
    x[1, 100:250] = 7.0                    # 150 ties above everything
    x[3] = (torch.randn(N, device=device) * 0.5).round()   # ~480 entries tie at the threshold: > CAP
    out, fb = _check_one(x, k, _cap=256)
    assert fb == 2
    assert torch.equal(out[1].sort().values.cpu(), torch.arange(100, 250, dtype=torch.int32))
    assert (out[0, 100:] == -1).all()
    _, fb = _check_one(x[1:3], k, _cap=128)           # a CAP below k: every row is bad
    assert fb == 2


def test_fp16_rows_and_sorted(device):
    torch.manual_seed(24)
    y = (torch.randn(3, 2049, device=device) * 2).to(torch.float16)   # fp16: many ties, 8 entries per vector
    _check(y, 300, _path="one", _cap=512, row_start=torch.tensor([1, 0, 9], dtype=torch.int32, device=device))
    x = (torch.randn(3, 1500, device=device) * 2).round()
    out = topk_rows(x, 120, sorted=True, _path="one", _cap=256)
    assert torch.equal(out.cpu(), topk_rows_reference(x, 120).cpu())


@pytest.mark.parametrize("warps", [2, 4])
def test_candidate_regions_of_several_warps(device, warps):
    """The scan gives each warp a region of cap / warps candidate slots (``triton._scan_x_warps``). The
    interpreter's default program is one warp, so this forces 2 and 4: ragged and unaligned windows, fp16 rows,
    and a row whose candidates all lie in one warp's columns (its region overflows: the whole-row select, still
    exact; the other rows unaffected)."""
    torch.manual_seed(26 + warps)
    R, N, k = 5, 3001, 100       # ~160 candidates a sampled row: over 256 / warps in one region, not in two
    x = torch.randn(R, N, device=device) * 3
    cols = torch.arange(N, device=device)
    start = torch.tensor([0, 17, 1003, 3, 0], dtype=torch.int32, device=device)
    end = torch.tensor([3001, 2999, 2500, 2222, 3001], dtype=torch.int32, device=device)
    for dt in (torch.float32, torch.float16):
        # block row i (v = one 16-byte vector of entries) is thread i % (32 * warps)'s: warp 0 holds the columns
        # c with c % (32 * v * warps) < 32 * v
        v = 16 // torch.empty(0, dtype=dt).element_size()
        xd = x.clone()
        xd[4] = torch.where(cols % (32 * v * warps) < 32 * v, x[4] + 20, x[4])
        xd = xd.to(dt)
        stats = {}
        stages, out, dbg = plan_launches(xd, k, start, end, _path="one", _cap=256, _warps=warps)
        for _, fn in stages:
            fn()
        stats.update(dbg)
        ref = topk_rows_reference(xd, k, row_start=start, row_end=end)
        for r in range(R):
            o, f = out[r].cpu(), ref[r].cpu()
            assert torch.equal(o.sort().values, f.sort().values), (dt, r)
        bad = (stats["ctr"][:, 0] == 2147483647).cpu()      # the counters of a whole-row select
        assert bad[4] and not bad[0], bad       # (short windows may overflow a region by chance: still exact)


@pytest.mark.parametrize("v", [4, 8])
def test_scan_store_ptx_puts_the_column_in_the_low_word(v):
    """The scan's inline-PTX store (compiled code only, so the interpreter runs its torch-op twin) writes each
    candidate as two 32-bit words; the select decodes ``c >> 32`` as the value and ``c & 0xFFFFFFFF`` as the
    column, so the column must be the first (low, little-endian) word and the value the entry's own operand.
    Run 121 stored them the other way round: every GPU set wrong, every interpreter test green."""
    import re

    from indexcache.kernels.topk.triton import _store_asm

    stores = re.findall(r"st\.global\.v2\.b32 \[a\], \{(\w+), \$(\d+)\}", _store_asm(v))
    assert len(stores) == v
    for j, (lo, hi) in enumerate(stores):
        assert lo == "c" and int(hi) == 2 * v + j      # the column register, then entry j's fp32 bits
    assert _store_asm(v).count("add.s32 c, $%d, " % (5 * v)) == v


def test_one_launch_and_no_recompiles(device):
    """One launch per call; shapes, windows and k reuse one compiled variant (per dtype / alignment)."""
    from indexcache.kernels.topk import triton as t1
    if not use_triton(torch.empty(1, device=device)):
        pytest.skip("Triton path not active")
    stages, _, _ = plan_launches(torch.randn(2, 100, device=device), 8, _path="one")
    assert [n for n, _ in stages] == ["select"]
    seen = set()
    hook = lambda *a, **kw: seen.add(_variant_key(t1._topk1_kernel, a, kw))  # noqa: E731
    t1._topk1_kernel.add_pre_run_hook(hook)
    torch.manual_seed(25)
    try:
        for R, N, k in ((3, 700, 17), (5, 1300, 33), (2, 2100, 64), (4, 512, 1)):
            ends = torch.arange(N - R + 1, N + 1, dtype=torch.int32, device=device)
            _check(torch.randn(R, N, device=device), k, _path="one", row_end=ends, _cap=256)
    finally:
        t1._topk1_kernel.pre_run_hooks.remove(hook)
    assert len(seen) == 1, seen


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_one_pass_long_rows(dtype):
    torch.manual_seed(26)
    x, ends = long_hard_rows(dtype)
    (R, N), k = x.shape, 2048
    _check(x, k, row_end=ends, _path="one")
    y = torch.randn(300, 70_001, device="cuda").to(dtype)
    _check(y, k, _path="one", row_start=torch.randint(0, 9, (300,), dtype=torch.int32, device="cuda"))
    assert _check_one(y, k)[1] == 0
    _check(torch.randn(3, 200_000, device="cuda"), 4096, _path="one")
    _check(torch.randn(70, 1_000_000, device="cuda"), k, _path="one")


def test_register_sample_prefetched_scan_causal(device):
    """Causal windows (the rows grow with their index, the kernel takes the last first) long enough for the sample
    held in registers and for the prefetched middle blocks, with a NaN-masked tail past each row end, a row with
    hundreds of ties at the threshold (lowest columns win; the selected scores compared), an unaligned view."""
    torch.manual_seed(27)
    R, N, k = 5, 6000, 1000
    x = torch.randn(R, N, device=device) * 2
    ends = torch.tensor([4500, 4801, 5333, 5999, 6000], dtype=torch.int32, device=device)
    x.masked_fill_(torch.arange(N, device=device)[None, :] >= ends[:, None].long(), float("nan"))
    x[2, :5333] = (torch.randn(5333, device=device) * 2).round()     # ~700 entries tie at the k-th value
    out, fb = _check_one(x, k, row_end=ends)
    assert fb == 0
    assert all(((out[r] >= 0) & (out[r] < ends[r])).all() for r in range(R))
    _, fb = _check_one(x[:, 1:], k, row_end=ends - 1)
    assert fb == 0
