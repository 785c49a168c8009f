"""RMSNorm (+ residual add): Triton (interpreter on CPU) vs the PyTorch reference, on ragged widths and row counts,
strided inputs and NaN-poisoned outputs."""
import pytest
import torch

from indexcache.kernels.rms_norm import rms_norm, rms_norm_reference


def _rows(t, d, dtype, device, seed, stride_pad=0):
    """[t, d] random rows of varied scale; with ``stride_pad`` a column slice of a wider tensor (row stride > d)."""
    g = torch.Generator().manual_seed(seed)
    full = torch.randn(t, d + stride_pad, generator=g) * (0.1 + 4 * torch.rand(t, 1, generator=g))
    return full.to(dtype).to(device)[:, stride_pad:]


def _ulps_apart(a, b, dtype):
    """Elementwise distance in units of the dtype's spacing at b (0 where equal)."""
    return ((a.float() - b.float()).abs() / (b.float().abs() * torch.finfo(dtype).eps).clamp(
        min=torch.finfo(dtype).tiny)).nan_to_num(0.0)


def _close(got, want, dtype):
    # the kernel sums squares in another order: the normalised row may round one ulp apart, rarely
    assert torch.isfinite(got).all()
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    else:
        ulps = _ulps_apart(got, want, dtype)
        assert ulps.max() <= 2.0, ulps.max()
        assert (got != want).float().mean() < 0.02


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("t,d,pad", [(37, 128, 0), (5, 200, 24), (19, 768, 576), (3, 2048, 0), (1, 576, 0)])
def test_rms_norm_matches_reference(dtype, t, d, pad, device):
    x = _rows(t, d, dtype, device, seed=d + t, stride_pad=pad)
    w = (1 + 0.5 * torch.randn(d, generator=torch.Generator().manual_seed(3))).to(dtype).to(device)
    out = torch.full((t, d), float("nan"), dtype=dtype, device=device)
    got = rms_norm(x, w, 1e-6, out=out)
    assert got.data_ptr() == out.data_ptr()
    _close(got, rms_norm_reference(x, w, 1e-6), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("t,d", [(29, 256), (4, 2048), (9, 100)])
def test_rms_norm_with_residual_matches_reference(dtype, t, d, device):
    x = _rows(t, d, dtype, device, seed=t)
    r = _rows(t, d, dtype, device, seed=t + 100, stride_pad=16)
    w = (1 + 0.5 * torch.randn(d, generator=torch.Generator().manual_seed(4))).to(dtype).to(device)
    out = torch.full((t, d), float("nan"), dtype=dtype, device=device)
    s_out = torch.full((t, d + 8), float("nan"), dtype=dtype, device=device)[:, 8:]
    y, s = rms_norm(x, w, 1e-5, residual=r, out=out, residual_out=s_out)
    want_y, want_s = rms_norm_reference(x, w, 1e-5, residual=r)
    assert torch.equal(s, want_s)  # the sum rounds once, as torch's add does
    _close(y, want_y, dtype)


def test_rms_norm_promotes_to_an_fp32_weight(device):
    # a bf16/fp16 stream with an fp32 weight gives fp32 (torch's promotion), the normalised row still rounded
    x = _rows(11, 64, torch.float16, device, seed=7)
    w = torch.randn(64, generator=torch.Generator().manual_seed(8)).to(device)
    got = rms_norm(x, w, 1e-6)
    want = rms_norm_reference(x, w, 1e-6)
    assert got.dtype == want.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=2e-3 * float(w.abs().max()), rtol=1e-3)


def test_rms_norm_empty_and_bad_input(device):
    w = torch.ones(64, device=device)
    assert rms_norm(torch.empty(0, 64, device=device), w, 1e-6).shape == (0, 64)
    with pytest.raises(ValueError, match="weight must be"):
        rms_norm(torch.randn(3, 64, device=device), torch.ones(32, device=device), 1e-6)
    with pytest.raises(ValueError, match="residual must be"):
        rms_norm(torch.randn(3, 64, device=device), w, 1e-6, residual=torch.randn(3, 32, device=device))
    with pytest.raises(ValueError, match="x must be"):
        rms_norm(torch.randn(2, 3, 64, device=device), w, 1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("t,d,pad", [(4096, 2048, 0), (333, 768, 576), (1000, 512, 64), (7, 7168, 0)])
def test_rms_norm_bf16_on_gpu(t, d, pad):
    x = _rows(t, d, torch.bfloat16, "cuda", seed=d, stride_pad=pad)
    r = _rows(t, d, torch.bfloat16, "cuda", seed=d + 1)
    w = (1 + 0.5 * torch.randn(d, generator=torch.Generator().manual_seed(3))).to(torch.bfloat16).cuda()
    _close(rms_norm(x, w, 1e-6), rms_norm_reference(x, w, 1e-6), torch.bfloat16)
    y, s = rms_norm(x, w, 1e-5, residual=r)
    want_y, want_s = rms_norm_reference(x, w, 1e-5, residual=r)
    assert torch.equal(s, want_s)
    _close(y, want_y, torch.bfloat16)
