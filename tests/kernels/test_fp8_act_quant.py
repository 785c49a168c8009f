"""The Triton 1x128 activation quantisation (interpreter on CPU; bf16 on the GPU) against the PyTorch reference,
bit for bit: ragged M with padding rows, K a multiple of 128 and ragged, all-zero rows, values just below a power
of two (where rounding carries into the exponent), strided inputs and NaN-poisoned outputs."""
import pytest
import torch

from indexcache.kernels._dispatch import interpreting
from indexcache.kernels.fp8_linear import quantize_act_reference


def _x(m, k, seed, device="cpu"):
    g = torch.Generator(device).manual_seed(seed)
    # channel magnitudes over three decades: every group gets its own scale, and small values land in subnormals
    x = torch.randn(m, k, generator=g, device=device) * torch.logspace(-2, 1, k, device=device)
    if m > 3:
        x[2] = 0.0  # an all-zero row: scale 1e-12 / 448, zeros
    return x


def _poisoned_quant(x, pad):
    """Run the kernel into outputs pre-filled with NaN (fp8 0x7f is e4m3fn's NaN) to show every element is written."""
    from indexcache.kernels.fp8_linear import triton as kt

    real_empty, real_strided = torch.empty, torch.empty_strided

    def empty(*a, **kw):
        return real_empty(*a, **kw).view(torch.uint8).fill_(0x7F).view(torch.float8_e4m3fn)

    def empty_strided(*a, **kw):
        return real_strided(*a, **kw).fill_(float("nan"))

    kt.torch.empty, kt.torch.empty_strided = empty, empty_strided
    try:
        return kt.quantize_act_triton(x, pad)
    finally:
        kt.torch.empty, kt.torch.empty_strided = real_empty, real_strided


@pytest.mark.skipif(not interpreting() and not torch.cuda.is_available(), reason="needs the Triton interpreter or CUDA")
@pytest.mark.parametrize("m,k,pad,dtype", [(37, 256, 4, torch.float32), (1, 128, 4, torch.float32),
                                           (70, 384, 1, torch.float16), (5, 300, 4, torch.float32),
                                           (64, 128, 4, torch.float16)])
def test_triton_equals_reference(m, k, pad, dtype, device):
    x = _x(m, k, seed=m + k, device=device).to(dtype)
    q, s = _poisoned_quant(x, pad)
    mp = -(-m // pad) * pad
    assert q.shape == (mp, k) and s.shape == (mp, -(-k // 128)) and s.stride() == (1, mp)
    qr, sr = quantize_act_reference(x)
    assert torch.equal(q[:m].view(torch.uint8), qr.view(torch.uint8))
    assert torch.equal(s[:m], sr)
    # padding rows: zeros with the all-zero group's scale
    assert torch.equal(q[m:].float(), torch.zeros(mp - m, k, device=device))
    assert torch.equal(s[m:], torch.full((mp - m, s.shape[1]), 1e-12 / 448, device=device))
    if m > 3:
        assert torch.equal(q[2].float(), torch.zeros(k, device=device))


@pytest.mark.skipif(not interpreting() and not torch.cuda.is_available(), reason="needs the Triton interpreter or CUDA")
def test_rounding_carries_and_strided_input(device):
    """Values that round up into the next binade (7.99 -> 8 on e4m3's grid), ties, and a column slice as input."""
    from indexcache.kernels.fp8_linear.triton import quantize_act_triton

    base = torch.tensor([448.0, 7.99, 7.5, 15.5, 0.0155, -3.76, 2 ** -9 * 1.5, -(2 ** -9) * 2.5, 239.0, 1e-6],
                        device=device)
    full = torch.randn(4, 512 + 9, device=device)
    full[:, :10] = base
    x = full[:, :512]
    q, s = quantize_act_triton(x)
    qr, sr = quantize_act_reference(x.contiguous())
    assert torch.equal(q.view(torch.uint8), qr.view(torch.uint8)) and torch.equal(s, sr)


@pytest.mark.gpu
@pytest.mark.parametrize("m,k", [(1, 2048), (33, 7168), (4096, 10240)])
def test_bf16_on_gpu(m, k):
    from indexcache.kernels.fp8_linear.triton import quantize_act_triton

    x = _x(m, k, seed=m, device="cuda").to(torch.bfloat16)
    q, s = quantize_act_triton(x, 4)
    qr, sr = quantize_act_reference(x)
    assert torch.equal(q[:m].view(torch.uint8), qr.view(torch.uint8)) and torch.equal(s[:m], sr)


def test_bad_input_is_named():
    from indexcache.kernels.fp8_linear.triton import quantize_act_triton

    with pytest.raises(ValueError, match="torch.int32"):
        quantize_act_triton(torch.zeros(2, 128, dtype=torch.int32))
    with pytest.raises(ValueError, match="pad_rows_to must be >= 1, got 0"):
        quantize_act_triton(torch.zeros(2, 128), 0)
