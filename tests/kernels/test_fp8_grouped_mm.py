"""Grouped GEMM on FP8 block-scaled expert weights: Triton (interpreter on CPU, fp32 activations) against the
reference on ragged groups, empty experts, ragged N/K and NaN-poisoned outputs; the reference against
dequantise-then-matmul."""
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
    got = fp8_grouped_mm_reference(a, counts, w, s)
    rows = [0, 0, 0, 2, 2, 2, 2, 2, 3]
    want = torch.stack([a[r] @ dequantize_expert(w[e], s[e]).t() for r, e in enumerate(rows)])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


# (counts per expert, N, K, block_m, block_n): ragged groups, empty experts (first, middle, last), N and K not
# multiples of 128, tiles smaller than a group and groups smaller than a tile
CASES = [
    ([3, 0, 5, 1], 200, 300, 16, 64),
    ([0, 17, 0, 0, 2], 128, 256, 16, 32),
    ([1], 576, 128, 16, 128),
    ([40, 1, 0], 96, 160, 32, 64),
    ([0, 0, 0], 64, 128, 16, 64),
]


@pytest.mark.skipif(not interpreting() and not torch.cuda.is_available(), reason="needs the Triton interpreter or CUDA")
@pytest.mark.parametrize("counts,n,k,bm,bn", CASES)
def test_triton_matches_reference(counts, n, k, bm, bn, device):
    from indexcache.kernels.fp8_grouped_mm.triton import fp8_grouped_mm_triton

    a, c, w, s = _inputs(counts, n, k, seed=n + k, device=device)
    want = fp8_grouped_mm_reference(a, c, w, s)
    out = torch.full((a.shape[0], n), float("nan"), device=device)  # a row or column left unwritten shows
    got = fp8_grouped_mm_triton(a, c, w, s, out=out, block_m=bm, block_n=bn)
    assert not got.isnan().any()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not interpreting() and not torch.cuda.is_available(), reason="needs the Triton interpreter or CUDA")
@pytest.mark.parametrize("counts,n,k,bm,bn", [CASES[0], CASES[1], CASES[3]])
def test_triton_fp8_activations_match_reference(counts, n, k, bm, bn, device):
    """W8A8: activations quantised per 1x128 group (ragged K: a partial last group), scales per row."""
    from indexcache.kernels.fp8_grouped_mm.triton import fp8_grouped_mm_triton

    a, c, w, s = _inputs(counts, n, k, seed=n + k + 1, device=device)
    a8, sa = quantize_act_reference(a)
    want = fp8_grouped_mm_reference(a8, c, w, s, sa, torch.float32)
    # the same as the bf16-activation path on the dequantised activations
    torch.testing.assert_close(want, fp8_grouped_mm_reference(dequantize_act(a8, sa), c, w, s), rtol=1e-6, atol=1e-6)
    out = torch.full((a.shape[0], n), float("nan"), device=device)
    got = fp8_grouped_mm_triton(a8, c, w, s, a_scale=sa, out=out, block_m=bm, block_n=bn)
    assert not got.isnan().any()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_strided_views_and_checks():
    a, c, w, s = _inputs([2, 3], 256, 128, seed=3)
    # gate/up halves as strided views of one stacked weight (how the model calls it when I % 128 != 0)
    got = fp8_grouped_mm(a, c, w[:, 128:], s[:, 1:])
    torch.testing.assert_close(got, fp8_grouped_mm_reference(a, c, w[:, 128:].contiguous(), s[:, 1:].contiguous()))
    with pytest.raises(ValueError, match="scale_inv must be float32"):
        fp8_grouped_mm(a, c, w, s[:, :1])
    with pytest.raises(ValueError, match="counts must be"):
        fp8_grouped_mm(a, c[:1], w, s)
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        fp8_grouped_mm(a, c, w.float(), s)
    a8, sa = quantize_act_reference(a)
    with pytest.raises(ValueError, match="fp8 activations need a_scale"):
        fp8_grouped_mm(a8, c, w, s, out_dtype=torch.float32)
    with pytest.raises(ValueError, match="fp8 activations need out_dtype"):
        fp8_grouped_mm(a8, c, w, s, a_scale=sa)


@pytest.mark.gpu
@pytest.mark.parametrize("counts", [[1, 0, 0, 2] + [0] * 60, [37, 0, 250, 1] * 16])
def test_triton_bf16_on_gpu(counts):
    a, c, w, s = _inputs(counts, 3072, 2048, seed=len(counts), device="cuda", dtype=torch.bfloat16)
    got = fp8_grouped_mm(a, c, w, s).float()
    want = fp8_grouped_mm_reference(a, c, w, s).float()
    # bf16 activations into the tensor cores, fp32 accumulation, one bf16 rounding of the output (2^-8)
    assert float((got - want).norm() / want.norm()) < 4e-3
    from indexcache.kernels.fp8_linear import quantize_act

    a8, sa = quantize_act(a)  # W8A8 on the FP8 tensor cores: the same quantised operands as the reference
    got8 = fp8_grouped_mm(a8, c, w, s, a_scale=sa, out_dtype=torch.bfloat16).float()
    want8 = fp8_grouped_mm_reference(a8, c, w, s, sa, torch.float32)
    assert float((got8 - want8).norm() / want8.norm()) < 4e-3
