"""FP8 block-scaled linear: quantisation round trips, the reference against dequantise-then-matmul on ragged
shapes, and (GPU) torch's block-scaled scaled_mm against the reference."""
import pytest
import torch

from indexcache.kernels.fp8_linear import (SMALL_M_MAX, block_scaled_mm_available, dequantize_act, dequantize_weight,
                                           fp8_linear, fp8_linear_reference, fp8_linear_weight_only_reference,
                                           gpu_path_reason, quantize_act, quantize_act_reference, quantize_weight,
                                           weight_scale_for_mm)


def _rand(*shape, seed=0, device="cpu"):
    g = torch.Generator(device).manual_seed(seed)
    # magnitudes that vary across channels, so every 128-group and block gets its own scale
    return torch.randn(*shape, generator=g, device=device) * torch.logspace(-2, 1, shape[-1], device=device)


@pytest.mark.parametrize("m,k", [(1, 128), (7, 300), (33, 576), (5, 64)])
def test_activation_round_trip(m, k):
    x = _rand(m, k, seed=m)
    q, s = quantize_act_reference(x)
    assert q.dtype == torch.float8_e4m3fn and s.shape == (m, -(-k // 128)) and s.dtype == torch.float32
    back = dequantize_act(q, s)
    # e4m3 has 3 mantissa bits: relative rounding error <= 2^-4 for values in its normal range (>= 2^-6 * scale)
    normal = x.abs() >= s.repeat_interleave(128, 1)[:, :k] * 2 ** -6
    rel = ((back - x).abs() / x.abs())[normal]
    assert rel.max() <= 2 ** -4 + 1e-6, float(rel.max())
    # everywhere: half an ulp, i.e. 2^-4 |x| or, among the subnormals, half their step 2^-9 (times the scale)
    sc = s.repeat_interleave(128, 1)[:, :k]
    assert ((back - x).abs() <= 2 ** -4 * x.abs() + 2 ** -10 * sc * 1.0001).all()
    # fp32 scales (no power-of-two rounding): every full group's amax lands exactly on e4m3's 448
    full = k // 128 * 128
    amax = q[:, :full].float().abs().view(m, -1, 128).amax(-1)
    assert torch.equal(amax, torch.full_like(amax, 448.0))


def test_weight_round_trip_and_block_independence():
    w = _rand(300, 200, seed=1)
    q, s = quantize_weight(w)
    assert q.dtype == torch.float8_e4m3fn and s.shape == (3, 2)
    back = dequantize_weight(q, s)
    assert float((back - w).norm() / w.norm()) < 0.04
    s2 = s.clone()
    s2[2, 1] *= 3
    back2 = dequantize_weight(q, s2)
    assert torch.allclose(back2[256:, 128:], 3 * back[256:, 128:])
    assert torch.equal(back2[:256], back[:256]) and torch.equal(back2[:, :128], back[:, :128])
    with pytest.raises(ValueError, match=r"weight_scale_inv shape \(3, 1\)"):
        dequantize_weight(q, s[:, :1])


# (M, N, K): ragged M, N and K not multiples of 128 (576 = kv_a_proj's output), K a single partial block
SHAPES = [(1, 576, 256), (5, 200, 300), (17, 128, 64), (64, 384, 512), (3, 16, 1000)]


@pytest.mark.parametrize("m,n,k", SHAPES)
def test_reference_is_dequantise_then_matmul(m, n, k):
    x = _rand(m, k, seed=m + n)
    wq, ws = quantize_weight(_rand(n, k, seed=k) / k ** 0.5)
    got = fp8_linear_reference(x, wq, ws)
    want = dequantize_act(*quantize_act_reference(x)) @ dequantize_weight(wq, ws).t()
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    # and close to the unquantised product: two e4m3 roundings, relative error a few percent at most
    exact = x @ dequantize_weight(wq, ws).t()
    assert float((got - exact).norm() / exact.norm()) < 0.05
    # the op (CPU: the reference) on a strided 3-D input whose unused columns are NaN
    buf = torch.full((1, m, k + 7), float("nan"))
    buf[..., :k] = x
    y = fp8_linear(buf[..., :k], wq, ws)
    assert y.shape == (1, m, n) and not y.isnan().any()
    torch.testing.assert_close(y[0], got, rtol=0, atol=0)


def test_checks_name_the_bad_value():
    wq, ws = quantize_weight(_rand(256, 256))
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        fp8_linear(torch.randn(2, 256), wq.float(), ws)
    with pytest.raises(ValueError, match="has 128 input features"):
        fp8_linear(torch.randn(2, 128), wq, ws)
    assert gpu_path_reason(torch.randn(2, 256), wq) is not None  # CPU: the reference runs


@pytest.mark.parametrize("k", [384, 300])
def test_fast_quantisation_equals_reference(k):
    x = _rand(9, k, seed=k)
    q, s = quantize_act(x)
    qr, sr = quantize_act_reference(x)
    assert torch.equal(q.view(torch.uint8), qr.view(torch.uint8)) and torch.equal(s, sr)


def test_mm_layouts():
    q, s = quantize_act(torch.randn(5, 384), pad_rows_to=4)
    assert q.shape == (8, 384) and s.shape == (8, 3) and s.stride() == (1, 8)
    assert torch.equal(q[5:].float(), torch.zeros(3, 384))
    sb = weight_scale_for_mm(torch.rand(5, 6))
    assert sb.shape == (8, 5) and sb.stride() == (1, 8)


@pytest.mark.gpu
@pytest.mark.parametrize("m,n,k", [(1, 576, 2048), (7, 768, 2048), (64, 2048, 768), (300, 5120, 768),
                                   (4096, 2048, 5120), (33, 24576, 1536)])
def test_scaled_mm_matches_reference(m, n, k):
    if not block_scaled_mm_available("cuda"):
        pytest.skip("needs a Hopper GPU")
    x = _rand(m, k, seed=m, device="cuda").to(torch.bfloat16)
    wq, ws = quantize_weight(_rand(n, k, seed=n, device="cuda") / k ** 0.5)
    assert gpu_path_reason(x, wq) is None
    got = fp8_linear(x, wq, ws).float()
    # M <= SMALL_M_MAX (decode) reads the FP8 weights with bf16 activations (no activation quantisation)
    ref = fp8_linear_weight_only_reference if m <= SMALL_M_MAX else fp8_linear_reference
    want = ref(x, wq, ws, out_dtype=torch.float32)
    # same quantised operands; the GEMM accumulates in fp32 and rounds to bf16 (2^-8 relative) once
    err = float((got - want).norm() / want.norm())
    assert err < 4e-3, err
    assert not got.isnan().any()
