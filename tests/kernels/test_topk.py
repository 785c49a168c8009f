"""Exact top-k: index sets against the reference, the lower-column tie rule, -1 padding, adversarial buckets."""
import inspect

import pytest
import torch

from indexcache.kernels._dispatch import use_triton
from indexcache.kernels.topk import (bracket_stats, plan_launches, scratch_bytes_per_row, topk_rows,
                                     topk_rows_reference)
from indexcache.kernels.topk.ops import _SMALL_R
from tests.helpers import count_allocations, poison_torch_empty


@pytest.fixture(autouse=True)
def _poison_empty(monkeypatch):
    """Every buffer the kernels allocate (output, state, scratch) starts as NaN / -7777."""
    poison_torch_empty(monkeypatch)


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
    with pytest.raises(ValueError, match="sample"):
        topk_rows(x, 4, sample=100)


def _stats(x, k, **kw):
    """Run the checked call; return (fallback rows, mean bracket) of the Triton path."""
    if x.device.type == "cpu" and not use_triton(x):
        pytest.skip("Triton path not active")
    stats = {}
    _check(x, k, stats=stats, **kw)
    return bracket_stats(stats, k)


def test_many_chunks_most_without_candidates(device):
    """Small chunks: most scan programs see no bracket entry (they skip the atomic); others share a row's slots."""
    torch.manual_seed(7)
    R, N, k = 4, 5000, 40
    x = torch.randn(R, N, device=device) * 0.01
    x[0] = torch.arange(N, device=device).float()           # every candidate in the last chunk
    x[1, 4100:4300] = torch.linspace(1, 2, 200, device=device)  # candidates in one chunk, plenty sampled
    x[2, ::97] = 3.0 + torch.rand(x[2, ::97].shape, device=device)  # sparse maxima spread over all chunks
    start = torch.tensor([0, 3000, 0, 1], dtype=torch.int32, device=device)
    end = torch.tensor([N, N, 4001, 4999], dtype=torch.int32, device=device)
    for chunk in (256, 1024):
        fb, _ = _stats(x, k, _chunk=chunk)
        assert fb == 0
        _stats(x, k, _chunk=chunk, row_start=start, row_end=end)


def test_final_select_multi_round_ties(device):
    """Boundary bins larger than the tie buffer: several histogram rounds, down to column-id bins."""
    torch.manual_seed(8)
    R, N, k = 3, 4000, 300
    x = (torch.randn(R, N, device=device) * 2).round() / 2      # few distinct values, hundreds of ties each
    x[2] = 1.0
    x[2, 1234] = 2.0
    fb, _ = _stats(x, k)
    out = topk_rows(x, k)
    assert torch.equal(out[2].sort().values.cpu(),
                       torch.cat([torch.arange(k - 1), torch.tensor([1234])]).sort().values.to(torch.int32))


def test_bad_bracket_paths(device):
    """Rows whose bracket is bad both ways (too many above hi: writes past k dropped; bracket > CAP)."""
    torch.manual_seed(9)
    N, k = 6000, 600
    x = torch.randn(3, N, device=device)
    for j in range(5):               # 850 maxima between the sample runs (interpreter: 32 runs of 8) -> >= hi >= k
        x[0, j * 187 + 10: j * 187 + 180] += 40.0
    x[1, 100:400] = 7.0              # 300 ties above everything
    fb, _ = _stats(x, k)
    assert fb >= 1
    fb, _ = _stats(x, k, _cap=96)    # every row overflows the scratch list
    assert fb == 3
    fb, _ = _stats(x[:, :200], k)    # rows shorter than the sample: exact bracket, need == bracket size
    assert fb == 0


def _variant_key(fn, args, kwargs):
    """What Triton's JIT specialises a launch on, emulated (works for the interpreter and the compiler):
    constexpr values, tensor dtype + 16-byte alignment, and for ints not in do_not_specialize (== 1, % 16 == 0)."""
    pyfn = getattr(fn, "fn", fn)
    dns = getattr(fn, "do_not_specialize", None)
    if dns is None:
        dns = getattr(fn, "kwargs", {}).get("do_not_specialize")
    dns = set(dns or [])
    key = []
    for i, p in enumerate(inspect.signature(pyfn).parameters.values()):
        v = args[i] if i < len(args) else kwargs.get(p.name, p.default)
        ann = p.annotation
        if ann is not inspect.Parameter.empty and "constexpr" in str(ann):
            key.append((p.name, "c", v))
        elif isinstance(v, torch.Tensor):
            key.append((p.name, str(v.dtype), v.data_ptr() % 16 == 0))
        elif isinstance(v, int) and not isinstance(v, bool):
            if p.name in dns or i in dns:
                key.append((p.name, "i64" if abs(v) >= 2**31 else "i32"))
            else:
                key.append((p.name, v == 1, v % 16 == 0))
        else:
            key.append((p.name, type(v).__name__))
    extra = tuple(sorted((n, v) for n, v in kwargs.items() if n not in inspect.signature(pyfn).parameters))
    return tuple(key) + extra


def test_shape_changes_do_not_recompile(device):
    """A prefill changes (R, N, windows, k) every call and decode changes the context length every step:
    the number of compiled variants per kernel of the decode path (sample / fused scan / final) must stay a
    small constant (the one-pass prefill path: ``test_topk_onepass.test_one_launch_and_no_recompiles``)."""
    from indexcache.kernels.topk import triton as tk
    if not use_triton(torch.empty(1, device=device)):
        pytest.skip("Triton path not active")
    path = "scan"
    kernels = {"sample": tk._topk_sample_kernel, "scan": tk._topk_scan_kernel, "final": tk._topk_final_kernel}
    seen = {n: set() for n in kernels}
    hooks = {}
    for n, fn in kernels.items():
        hooks[n] = (lambda n, fn: lambda *a, **kw: seen[n].add(_variant_key(fn, a, kw)))(n, fn)
        fn.add_pre_run_hook(hooks[n])

    def cache_sizes():   # the compiler's own caches (absent in the interpreter / other Triton versions)
        out = {}
        for n, fn in kernels.items():
            dc = getattr(fn, "device_caches", None)
            if dc:
                out[n] = sum(len(c[0]) for c in dc.values())
        return out

    torch.manual_seed(10)
    try:
        topk_rows(torch.randn(2, 640, device=device), 32, _path=path)  # warm: one variant per kernel
        base = cache_sizes()
        shapes = [(3, 700, 17, None), (5, 1301, 33, "win"), (2, 2100, 64, "causal"), (1, 999, 16, None),
                  (7, 1600, 48, "causal"), (4, 513, 1, None)]
        for R, N, k, w in shapes:
            x = torch.randn(R, N, device=device)
            kw = {}
            if w == "causal":
                kw["row_end"] = torch.arange(N - R + 1, N + 1, dtype=torch.int32, device=device)
            elif w == "win":
                kw["row_start"] = torch.randint(0, N // 2, (R,), dtype=torch.int32, device=device)
                kw["row_end"] = torch.randint(N // 2, N + 1, (R,), dtype=torch.int32, device=device)
            _check(x, k, _path=path, **kw)
        # decode: one row, context grows by one each step
        for L in (1000, 1001, 1017, 1024, 1040):
            _check(torch.randn(1, L, device=device), 64, _path=path)
        after = cache_sizes()
    finally:
        for n, fn in kernels.items():
            fn.pre_run_hooks.remove(hooks[n])
    for n in kernels:
        # fp32 only here; the variant key may still split on pointer alignment of a sliced view (not here)
        assert 1 <= len(seen[n]) <= 2, (n, len(seen[n]), seen[n])
    for n, c in after.items():
        assert c - base.get(n, 0) <= 1, (n, base, after)


def long_hard_rows(dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """8 rows of 200K on the GPU with row ends (ragged: shorter than k, exactly k, ...): row 6 all ties, row 7
    clustered maxima. Returns (x, ends int32)."""
    R, N = 8, 200_000
    x = torch.randn(R, N, device="cuda").to(dtype)
    ends = torch.tensor([N, N - 7, 150_001, 2047, 2048, 3000, N, 100_000], dtype=torch.int32, device="cuda")
    x[6, :] = 0.25                                 # all ties
    x[7, 50_000:52_500] = 1e4                      # clustered maxima
    return x, ends


def hard_rows(R: int, N: int, device) -> torch.Tensor:
    """R >= 5 random rows of N, rows 1-4 hard: N/3 equal maxima at every third column (the lowest columns win),
    NaN, -0.0 next to +0.0, a row of -inf with 10 valid entries (padding), few distinct values (heavy ties at the
    threshold)."""
    x = torch.randn(R, N, device=device) * 3
    x[1] = torch.randn(N, device=device)
    x[1, ::3] = 5.0
    x[2, 100:200] = float("nan")
    x[2, 300] = -0.0
    x[2, 301] = 0.0
    x[3] = float("-inf")
    x[3, 1500:1510] = 0.5
    x[4] = (torch.randn(N, device=device) * 2).round()
    return x


def test_prefill_path_ragged_ties_padding(device):
    """One-pass prefill path: windows (incl. empty and shorter than k) on rows with ties, NaN / -inf, -0.0; with
    the default CAP (sampled rows) and a small one (more rows bad: whole-row select)."""
    path = "one"
    torch.manual_seed(11)
    R, N, k = 6, 5000, 100
    x = hard_rows(R, N, device)
    start = torch.tensor([0, 0, 17, 0, 1000, 2990], dtype=torch.int32, device=device)
    end = torch.tensor([N, N, 4000, N, 1000, 3001], dtype=torch.int32, device=device)
    for cap in (None, 256):
        stats = {}
        out = _check(x, k, _path=path, _cap=cap, row_start=start, row_end=end, stats=stats)
        if cap is None:   # rows 0, 1 sampled and good; row 3: 10 valid entries < k, the whole-row select
            assert bracket_stats(stats, k)[0] == 1
        assert torch.equal(out[1].sort().values.cpu(), torch.arange(0, 3 * k, 3, dtype=torch.int32))
        assert (out[3, 10:] == -1).all() and (out[4] == -1).all() and (out[5, 11:] == -1).all()
        for r in range(R):
            v = out[r][out[r] >= 0]
            assert ((v >= start[r]) & (v < end[r])).all()


def test_prefill_path_bad_rows_fall_back(device):
    """One-pass prefill path: rows whose candidates cannot hold the top k (CAP below k) take the whole-row
    select, exactly; maxima clustered between sample strides, 300 ties above everything; rows no longer than
    CAP take every entry (never bad); adversarial shared bucket and fp16 inputs."""
    path = "one"
    torch.manual_seed(12)
    N, k = 6000, 600
    x = torch.randn(4, N, device=device)
    for j in range(5):
        x[0, j * 187 + 10: j * 187 + 180] += 40.0
    x[1, 100:400] = 7.0
    x[3, 3000:3200] += 50.0
    _stats(x, k, _path=path)
    fb, _ = _stats(x, k, _path=path, _cap=96)
    assert fb == 4
    fb, _ = _stats(x[:, :200], k, _path=path)          # rows of <= CAP entries: every valid entry, exact
    assert fb == 0
    base = torch.full((4500,), 1.0)
    y = torch.stack([base + torch.randint(0, 16, (4500,)).float() * 2.0**-23,
                     base + torch.randint(0, 3, (4500,)).float() * 2.0**-23]).to(device)
    _check(y, 100, _path=path)
    _check((torch.randn(2, 4100, device=device) * 2).to(torch.float16), 300, _path=path)


def test_default_path_by_row_count(device):
    """R <= _SMALL_R takes the fused scan (decode), larger R the one-launch path (prefill)."""
    if not use_triton(torch.empty(1, device=device)):
        pytest.skip("Triton path not active")
    torch.manual_seed(13)
    stats = {}
    _check(torch.randn(_SMALL_R + 1, 300, device=device), 20, stats=stats)
    assert stats["path"] == "one"
    _check(torch.randn(2, 300, device=device), 20, stats=stats)
    assert stats["path"] == "scan"
    _check(torch.randn(1, 700, device=device), 20, stats=stats, sample=512)   # explicit sample size
    assert stats["S"] == 512


@pytest.mark.parametrize("R", [3, _SMALL_R + 1])
def test_scratch_bound_covers_allocations(device, monkeypatch, R):
    """``scratch_bytes_per_row`` (the indexer's workspace planning) bounds the bytes a call allocates per row, on
    the decode path (R <= _SMALL_R) and on the one-pass prefill path."""
    if not use_triton(torch.empty(1, device=device)):
        pytest.skip("Triton path not active")
    allocated = count_allocations(monkeypatch)
    for k, n in ((1, 300), (100, 5000), (256, 70_000)):
        x = torch.randn(R, n, device=device)
        allocated.clear()
        plan_launches(x, k)
        assert 0 < sum(allocated) <= R * scratch_bytes_per_row(k, n), (k, n, allocated)


def test_sorted_flag_prefill_path(device):
    torch.manual_seed(14)
    x = (torch.randn(3, 1500, device=device) * 2).round()
    out = topk_rows(x, 120, sorted=True, _path="one")
    assert torch.equal(out.cpu(), topk_rows_reference(x, 120).cpu())


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_long_rows(dtype):
    torch.manual_seed(6)
    x, ends = long_hard_rows(dtype)
    (R, N), k = x.shape, 2048
    for path in ("scan", "one"):
        _check(x, k, row_end=ends, _path=path)
    _check(torch.randn(300, 70_000, device="cuda").to(dtype), k)
    _check(torch.randn(3, 200_000, device="cuda"), 4096)
