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


@pytest.mark.parametrize("m,e,bm", [(100, 8, 64), (1000, 8, 128)])
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
