"""Grouped GEMM of 1x128-quantised fp8 activations on FP8 block-scaled expert weights: Triton (interpreter on CPU;
the table's configurations on the GPU) against the reference on ragged groups, empty experts, ragged N/K and
NaN-poisoned outputs; the reference against dequantise-then-matmul."""
import pytest
import torch

from indexcache.kernels._dispatch import interpreting
from indexcache.kernels.fp8_grouped_mm import dequantize_expert, fp8_grouped_mm, fp8_grouped_mm_reference
from indexcache.kernels.fp8_linear import dequantize_act, quantize_act_reference, quantize_weight


def _inputs(counts, n, k, *, seed=0, device="cpu", dtype=torch.float32):
    g = torch.Generator(device).manual_seed(seed)
    E, M = len(counts), sum(counts)
    a = torch.randn(M, k, generator=g, device=device).to(dtype)
    ws = [quantize_weight(torch.randn(n, k, generator=g, device=device) * torch.rand(1, k, generator=g, device=device)
                          / k ** 0.5) for _ in range(E)]
    w = torch.stack([q for q, _ in ws])
    s = torch.stack([sc for _, sc in ws])
    return a, torch.tensor(counts, dtype=torch.int32, device=device), w, s


def test_reference_is_dequantise_then_matmul():
    a, counts, w, s = _inputs([3, 0, 5, 1], 200, 300, seed=1)
    a8, sa = quantize_act_reference(a)
    got = fp8_grouped_mm_reference(a8, counts, w, s, sa, torch.float32)
    rows = [0, 0, 0, 2, 2, 2, 2, 2, 3]
    ad = dequantize_act(a8, sa)
    want = torch.stack([ad[r] @ dequantize_expert(w[e], s[e]).t() for r, e in enumerate(rows)])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


# (counts per expert, N, K, config): ragged groups, empty experts (first, middle, last), N and K not multiples of
# 128 (a partial last activation group and weight block), tiles smaller than a group and groups smaller than a
# tile, more tiles than GROUP_M (the grouped launch order wraps)
def _cfg(bm, bn):
    return {"block_m": bm, "block_n": bn, "num_warps": 4, "num_stages": 2}


CASES = [
    ([3, 0, 5, 1], 200, 300, _cfg(16, 64)),
    ([0, 17, 0, 0, 2], 128, 256, _cfg(16, 32)),
    ([1], 576, 128, _cfg(16, 128)),
    ([40, 1, 0], 96, 160, _cfg(32, 64)),
    ([0, 0, 0], 64, 128, _cfg(16, 64)),
    ([70, 3, 0, 90], 256, 256, _cfg(16, 128)),
]


def _assert_matches(got, want, a8, sa, counts, w, s):
    """The interpreter (fp32 dots on exact fp8 values) matches to fp32 rounding. On a Hopper GPU the fp8 tensor
    cores accumulate each 128-deep tile's products with reduced precision (Triton's default for fp8 dots there;
    about 14 significant bits, per DeepSeek-V3's report) before the fp32 accumulator: the error of each output is
    bounded by a few 2^-14 of sum_k |a_k W_k|, so the GPU gets an elementwise bound of 2^-10 times |a| @ |W|^T."""
    assert not got.isnan().any()
    if not got.is_cuda:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        return
    mag = fp8_grouped_mm_reference(a8.float().abs().to(torch.float8_e4m3fn), counts, w.float().abs().to(w.dtype),
                                   s, sa, torch.float32)
    bad = (got - want).abs() > 2 ** -10 * mag + 1e-6
    assert not bad.any(), f"{int(bad.sum())} outputs beyond the bound; max err {float((got - want).abs().max())}"


@pytest.mark.skipif(not interpreting() and not torch.cuda.is_available(), reason="needs the Triton interpreter or CUDA")
@pytest.mark.parametrize("counts,n,k,cfg", CASES)
def test_triton_matches_reference(counts, n, k, cfg, device):
    from indexcache.kernels.fp8_grouped_mm.triton import fp8_grouped_mm_triton

    a, c, w, s = _inputs(counts, n, k, seed=n + k, device=device)
    a8, sa = quantize_act_reference(a)
    sa = sa.t().contiguous().t()  # column-major, as quantize_act returns it on the GPU
    want = fp8_grouped_mm_reference(a8, c, w, s, sa, torch.float32)
    out = torch.full((a.shape[0], n), float("nan"), device=device)  # a row or column left unwritten shows
    # small tiles in the interpreter (many tiles on few rows); on the GPU the table's configurations, as run
    got = fp8_grouped_mm_triton(a8, c, w, s, sa, out=out, config=None if a.is_cuda else cfg)
    _assert_matches(got, want, a8, sa, c, w, s)


@pytest.mark.parametrize("m,e,bm", [(100, 8, 64), (1000, 8, 64)])
def test_config_table(m, e, bm):
    from indexcache.kernels.fp8_grouped_mm.triton import config_for

    cfg = config_for(m, e)
    assert cfg["block_m"] == bm and 128 % cfg["block_n"] == 0


def test_strided_views_and_checks():
    a, c, w, s = _inputs([2, 3], 256, 128, seed=3)
    a8, sa = quantize_act_reference(a)
    # gate/up halves as strided views of one stacked weight (how the model calls it when I % 128 != 0)
    got = fp8_grouped_mm(a8, c, w[:, 128:], s[:, 1:], sa, torch.float32)
    want = fp8_grouped_mm_reference(a8, c, w[:, 128:].contiguous(), s[:, 1:].contiguous(), sa, torch.float32)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="scale_inv must be float32"):
        fp8_grouped_mm(a8, c, w, s[:, :1], sa)
    with pytest.raises(ValueError, match="counts must be"):
        fp8_grouped_mm(a8, c[:1], w, s, sa)
    with pytest.raises(ValueError, match="w must be float8_e4m3fn"):
        fp8_grouped_mm(a8, c, w.float(), s, sa)
    with pytest.raises(ValueError, match=r"a must be float8_e4m3fn \[M, K\] \(quantize_act\), got \(5, 128\) "
                                         r"torch.float32"):
        fp8_grouped_mm(a, c, w, s, sa)
    with pytest.raises(ValueError, match="fp8 activations need a_scale"):
        fp8_grouped_mm(a8, c, w, s, None)
    with pytest.raises(ValueError, match="out_dtype must be"):
        fp8_grouped_mm(a8, c, w, s, sa, torch.int8)


@pytest.mark.gpu
@pytest.mark.parametrize("counts", [[1, 0, 0, 2] + [0] * 60, [37, 0, 250, 1] * 16, [300] * 64])
def test_triton_bf16_on_gpu(counts):
    """bf16 activations quantised on the GPU (the model's path), both table configurations, bf16 output."""
    from indexcache.kernels.fp8_linear import quantize_act

    a, c, w, s = _inputs(counts, 3072, 2048, seed=len(counts), device="cuda", dtype=torch.bfloat16)
    a8, sa = quantize_act(a)
    got = fp8_grouped_mm(a8, c, w, s, sa, torch.bfloat16).float()
    want = fp8_grouped_mm_reference(a8, c, w, s, sa, torch.float32)
    # the reduced-precision fp8 accumulation (above) and one bf16 rounding of the output (2^-9 relative)
    err = float((got - want).norm() / want.norm())
    assert err < 4e-3, err


# ---- the MoE options: rows gathered by token (a_rows), rows stored weighted in pair order (out_rows, row_weight),
# and the fused gate/up + SwiGLU + 1x128 quantisation kernel ----

def _routing(counts, n_tokens, *, seed, device):
    """a_rows (the token each sorted row reads, tokens repeating), out_rows (a permutation) and row weights."""
    g = torch.Generator(device).manual_seed(seed)
    m = sum(counts)
    a_rows = torch.randint(0, n_tokens, (m,), generator=g, device=device, dtype=torch.int32)
    out_rows = torch.randperm(m, generator=g, device=device).to(torch.int32)
    return a_rows, out_rows, torch.rand(m, generator=g, device=device) + 0.1


def test_reference_gather_and_scatter_are_index_ops():
    a, c, w, s = _inputs([3, 0, 4], 128, 256, seed=5)
    a8, sa = quantize_act_reference(a)
    a_rows, out_rows, rw = _routing([3, 0, 4], a.shape[0], seed=6, device="cpu")
    plain = fp8_grouped_mm_reference(a8[a_rows.long()], c, w, s, sa[a_rows.long()], torch.float32)
    got = fp8_grouped_mm_reference(a8, c, w, s, sa, torch.float32, a_rows=a_rows, out_rows=out_rows, row_weight=rw)
    torch.testing.assert_close(got[out_rows.long()], plain * rw[:, None], rtol=1e-6, atol=1e-6)


@pytest.mark.skipif(not interpreting() and not torch.cuda.is_available(), reason="needs the Triton interpreter or CUDA")
@pytest.mark.parametrize("counts,n,k,cfg", [([3, 0, 5, 1], 200, 300, _cfg(16, 64)), ([0, 21, 0, 2], 128, 256, _cfg(16, 128))])
def test_triton_gather_scatter_matches_reference(counts, n, k, cfg, device):
    from indexcache.kernels.fp8_grouped_mm.triton import fp8_grouped_mm_triton

    a, c, w, s = _inputs(counts, n, k, seed=n + 1, device=device)
    a = a[: max(1, sum(counts) // 2 + 1)]  # fewer tokens than sorted rows: rows repeat tokens
    a8, sa = quantize_act_reference(a)
    sa = sa.t().contiguous().t()
    a_rows, out_rows, rw = _routing(counts, a.shape[0], seed=k, device=device)
    kw = dict(a_rows=a_rows, out_rows=out_rows, row_weight=rw)
    want = fp8_grouped_mm_reference(a8, c, w, s, sa, torch.float32, **kw)
    out = torch.full((sum(counts), n), float("nan"), device=device)
    got = fp8_grouped_mm_triton(a8, c, w, s, sa, out=out, config=None if a.is_cuda else cfg, **kw)
    assert not got.isnan().any()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_scatter_checks():
    a, c, w, s = _inputs([2, 3], 128, 128, seed=3)
    a8, sa = quantize_act_reference(a)
    idx = torch.arange(5, dtype=torch.int32)
    with pytest.raises(ValueError, match="out_rows and row_weight go together"):
        fp8_grouped_mm(a8, c, w, s, sa, out_rows=idx)
    with pytest.raises(ValueError, match=r"row_weight must be float32 \[5\]"):
        fp8_grouped_mm(a8, c, w, s, sa, out_rows=idx, row_weight=torch.ones(4))
    with pytest.raises(ValueError, match="a_rows must be int32/int64"):
        fp8_grouped_mm(a8, c, w, s, sa, a_rows=idx.float())


def _swiglu_inputs(counts, inter, k, n_tokens, *, seed, device):
    g = torch.Generator(device).manual_seed(seed)
    E, m = len(counts), sum(counts)
    x = torch.randn(n_tokens, k, generator=g, device=device)
    ws = [quantize_weight(torch.randn(inter, k, generator=g, device=device) / k ** 0.5) for _ in range(2 * E)]
    w = torch.stack([torch.cat([ws[2 * e][0], ws[2 * e + 1][0]]) for e in range(E)])
    s = torch.stack([torch.cat([ws[2 * e][1], ws[2 * e + 1][1]]) for e in range(E)])
    a_rows = torch.randint(0, n_tokens, (m,), generator=g, device=device, dtype=torch.int32)
    return x, torch.tensor(counts, dtype=torch.int32, device=device), w, s, a_rows


def test_swiglu_reference_is_silu_gate_times_up_quantised():
    from indexcache.kernels.fp8_grouped_mm import fp8_grouped_swiglu_reference

    inter, counts = 192, [2, 0, 3]
    x, c, w, s, a_rows = _swiglu_inputs(counts, inter, 256, 4, seed=7, device="cpu")
    x8, sx = quantize_act_reference(x)
    h8, sh = fp8_grouped_swiglu_reference(x8, c, w, s, sx, inter, a_rows=a_rows)
    xd = dequantize_act(x8, sx)[a_rows.long()]
    experts = [0, 0, 2, 2, 2]
    ib = 2
    want = torch.stack([torch.nn.functional.silu(xd[r] @ dequantize_expert(w[e, :inter], s[e, :ib]).t())
                        * (xd[r] @ dequantize_expert(w[e, inter:], s[e, ib:]).t()) for r, e in enumerate(experts)])
    _assert_h_close((h8, sh), quantize_act_reference(want), max_mismatch=0.01)  # fp32 matmul order differs


def _assert_h_close(got, want, *, max_mismatch, delta=0.0):
    """Two 1x128-quantised h: scales agree closely and the dequantised values within one e4m3 step (their fp32
    sums differ in order, so a value near a rounding boundary may land on the neighbour), rarely. On the GPU the
    fp8 dots accumulate with reduced precision (see _assert_matches): ``delta`` bounds what that does to h, and
    the scales differ by up to 2e-3: two steps, plus delta, plus that relative difference."""
    (h8, sh), (q8, sq) = got, want
    assert not sh.isnan().any() and not h8.float().isnan().any()
    rtol = 2e-3 if sh.is_cuda else 1e-5
    torch.testing.assert_close(sh, sq, rtol=rtol, atol=0)
    dg, dw = dequantize_act(h8, sh), dequantize_act(q8, sq)
    step = torch.maximum(dw.abs() * 2 ** -3, sq.repeat_interleave(128, 1)[:, : dw.shape[1]] * 2 ** -9)
    steps = 2 if sh.is_cuda else 1
    bad = (dg - dw).abs() > step * steps + delta + dw.abs() * 2 * rtol + 1e-12
    assert not bad.any(), (f"{int(bad.sum())} of {bad.numel()} beyond {steps} e4m3 steps; worst at "
                           f"{[int(i) for i in torch.nonzero(bad)[0]]}: {float(dg[bad][0])} vs {float(dw[bad][0])}")
    assert (h8.view(torch.uint8) != q8.view(torch.uint8)).float().mean() <= max_mismatch


@pytest.mark.skipif(not interpreting() and not torch.cuda.is_available(), reason="needs the Triton interpreter or CUDA")
@pytest.mark.parametrize("counts,inter,k", [([3, 0, 20, 1], 256, 256), ([0, 9, 0], 192, 384), ([5], 64, 128)])
def test_triton_swiglu_matches_reference(counts, inter, k, device):
    from indexcache.kernels.fp8_grouped_mm import fp8_grouped_swiglu_reference
    from indexcache.kernels.fp8_grouped_mm.triton import fp8_grouped_swiglu_triton

    x, c, w, s, a_rows = _swiglu_inputs(counts, inter, k, 7, seed=inter + k, device=device)
    x8, sx = quantize_act_reference(x)
    sx = sx.t().contiguous().t()
    m, ib = sum(counts), -(-inter // 128)
    out = (torch.full((m, inter), float("nan"), device=device).to(torch.float8_e4m3fn),
           torch.full((m, ib), float("nan"), device=device))
    cfg = None if x.is_cuda else {"block_m": 16, "num_warps": 4, "num_stages": 2}
    got = fp8_grouped_swiglu_triton(x8, c, w, s, sx, inter, a_rows=a_rows, out=out, config=cfg)
    want = fp8_grouped_swiglu_reference(x8, c, w, s, sx, inter, a_rows=a_rows)
    _assert_h_close(got, want, max_mismatch=0.01)


def test_swiglu_checks():
    from indexcache.kernels.fp8_grouped_mm import fp8_grouped_swiglu

    x, c, w, s, a_rows = _swiglu_inputs([2, 1], 128, 128, 3, seed=1, device="cpu")
    x8, sx = quantize_act_reference(x)
    with pytest.raises(ValueError, match=r"w must be \[E, 2\*inter=512, K\]"):
        fp8_grouped_swiglu(x8, c, w, s, sx, 256, a_rows=a_rows)
    with pytest.raises(ValueError, match=r"scale_inv must hold 2\*ceil\(inter/128\)=2 block rows"):
        fp8_grouped_swiglu(x8, c, w, s[:, :1], sx, 128, a_rows=a_rows)


@pytest.mark.gpu
@pytest.mark.parametrize("counts", [[1, 0, 0, 2] + [0] * 60, [37, 0, 250, 1] * 16, [600] * 64])
def test_triton_swiglu_and_scatter_on_gpu(counts):
    """The model's shapes (glm-4.7-flash: D 2048, I 1536), both table configurations, tokens gathered by index."""
    from indexcache.kernels.fp8_grouped_mm import fp8_grouped_swiglu, fp8_grouped_swiglu_reference
    from indexcache.kernels.fp8_linear import quantize_act

    m = sum(counts)
    x, c, w, s, a_rows = _swiglu_inputs(counts, 1536, 2048, max(1, m // 4), seed=len(counts), device="cuda")
    x8, sx = quantize_act(x.to(torch.bfloat16))
    got = fp8_grouped_swiglu(x8, c, w, s, sx, 1536, a_rows=a_rows)
    want = fp8_grouped_swiglu_reference(x8, c, w, s, sx, 1536, a_rows=a_rows)
    # the reduced-precision fp8 accumulation bound of _assert_matches on gate and up (2^-10 |a| @ |W|^T), carried
    # through silu(g) * u (silu' <= 1.1)
    x8a = x8.float().abs().to(torch.float8_e4m3fn)
    ib = 12
    parts = [fp8_grouped_mm_reference(a8_, c, w_, s_, sx, torch.float32, a_rows=a_rows) for a8_, w_, s_ in (
        (x8, w[:, :1536], s[:, :ib]), (x8, w[:, 1536:], s[:, ib:]),
        (x8a, w[:, :1536].float().abs().to(w.dtype), s[:, :ib]), (x8a, w[:, 1536:].float().abs().to(w.dtype), s[:, ib:]))]
    g, u, dg_, du_ = parts[0], parts[1], parts[2] * 2 ** -10, parts[3] * 2 ** -10
    delta = 1.1 * u.abs() * dg_ + (torch.nn.functional.silu(g).abs() + 1.1 * dg_) * du_
    _assert_h_close(got, want, max_mismatch=0.05, delta=delta * 1.01)
    a, c2, wd, sd = _inputs(counts, 2048, 1536, seed=3, device="cuda")
    _, out_rows, rw = _routing(counts, m, seed=4, device="cuda")
    y = fp8_grouped_mm(got[0], c, wd, sd, got[1], torch.bfloat16, out_rows=out_rows, row_weight=rw).float()
    ref = fp8_grouped_mm_reference(got[0], c, wd, sd, got[1], torch.float32, out_rows=out_rows, row_weight=rw)
    assert float((y - ref).norm() / ref.norm()) < 4e-3
