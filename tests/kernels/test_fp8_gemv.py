"""The weight-only (W8A16) small-M FP8 kernel against dequantise-then-matmul: M in {1, 3, 16}, ragged N and K
(partial last weight blocks), strided x, split-K, NaN-poisoned output buffers; bf16 and the fp8_linear routing on
the GPU."""
import pytest
import torch

from indexcache.kernels.fp8_linear import (SMALL_M_MAX, fp8_gemv_triton, fp8_linear, fp8_linear_reference,
                                           fp8_linear_weight_only_reference, quantize_weight, small_m_path)


def _rand(*shape, seed=0, device="cpu"):
    g = torch.Generator(device).manual_seed(seed)
    # magnitudes that vary across channels, so every 128 block gets its own scale
    return torch.randn(*shape, generator=g, device=device) * torch.logspace(-2, 1, shape[-1], device=device)


def _weight(n, k, seed, device="cpu"):
    return quantize_weight(_rand(n, k, seed=seed, device=device) / k ** 0.5)


# (N, K): 576 = kv_a_proj's output (a partial last weight row block), 768 a whole number of blocks, 2048 + 77 and
# 200 x 300 partial last K blocks
SHAPES = [(576, 768), (192, 2048 + 77), (200, 300)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("m", [1, 3, 16])
@pytest.mark.parametrize("n,k", SHAPES)
def test_gemv_matches_weight_only_reference(m, n, k, dtype, monkeypatch):
    wq, ws = _weight(n, k, seed=n + k)
    # x strided (a column slice of a NaN-padded buffer: the kernel must not read past K)
    buf = torch.full((m, k + 5), float("nan"), dtype=dtype)
    buf[:, :k] = _rand(m, k, seed=m).to(dtype)
    x = buf[:, :k]
    # the output comes from torch.empty: fill the allocator's fresh memory with NaN so an unwritten element shows
    real_empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *a, **kw: real_empty(*a, **kw).fill_(float("nan")))
    got = {s: fp8_gemv_triton(x, wq, ws, split_k=s) for s in (1, 3)}
    got[None] = fp8_gemv_triton(x, wq, ws)
    monkeypatch.undo()
    want = fp8_linear_weight_only_reference(x, wq, ws, out_dtype=torch.float32)
    for s, y in got.items():
        assert y.shape == (m, n) and y.dtype == dtype and not y.isnan().any(), s
        # fp32: both sides sum the same fp32 products in a different order (and the kernel applies the block scale
        # to the block's partial sum): ~1e-6 relative to the row's magnitude. fp16: the output's rounding
        # (2^-11 relative) dominates; 2e-3 of the largest |y| covers one ulp of every element
        tol = 1e-5 if dtype == torch.float32 else 2e-3
        scale = want.abs().amax()
        assert float((y.float() - want).abs().max() / scale) < tol, (s, float((y.float() - want).abs().max() / scale))


def test_gemv_split_k_is_repeatable_and_leaves_counters_at_zero():
    # the last program of each N tile sums the partials in split order: the same bits on every call, whichever
    # program arrives last, and the arrival counters are back at zero for the next call (and graph replays)
    from indexcache.kernels.arrival import arrival_counters

    wq, ws = _weight(200, 1000, seed=5)
    x = _rand(3, 1000, seed=6)
    first = fp8_gemv_triton(x, wq, ws, split_k=4)
    for split in (4, 4, 8):
        y = fp8_gemv_triton(x, wq, ws, split_k=split)
        if split == 4:
            assert torch.equal(y, first)
        assert not arrival_counters(x.device, 1).any()
    want = fp8_linear_weight_only_reference(x, wq, ws, out_dtype=torch.float32)
    assert float((y - want).abs().max() / want.abs().amax()) < 1e-5


def test_gemv_is_closer_to_exact_than_act_quant():
    # no activation quantisation: the weight-only result is nearer x @ dequant(w)^T than scaled_mm's reference
    wq, ws = _weight(256, 512, seed=3)
    x = _rand(4, 512, seed=4)
    exact = fp8_linear_weight_only_reference(x.double(), wq, ws)
    y = fp8_gemv_triton(x, wq, ws)
    aq = fp8_linear_reference(x, wq, ws)
    assert float((y - exact).norm() / exact.norm()) < 1e-5 < float((aq - exact).norm() / exact.norm())


def test_gemv_checks_name_the_bad_value():
    wq, ws = _weight(128, 256, seed=1)
    with pytest.raises(ValueError, match="M=17"):
        fp8_gemv_triton(torch.randn(17, 256), wq, ws)
    with pytest.raises(ValueError, match="split_k must be in"):
        fp8_gemv_triton(torch.randn(2, 256), wq, ws, split_k=3)
    with pytest.raises(ValueError, match=r"scale_inv shape \(1, 1\)"):
        fp8_gemv_triton(torch.randn(2, 256), wq, ws[:, :1])
    assert not small_m_path(torch.randn(2, 256), wq)  # CPU: fp8_linear keeps the reference


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 3, 8, 16])
@pytest.mark.parametrize("n,k", [(576, 2048), (5120, 768), (1536, 2048), (2048, 10240), (200, 2048 + 77)])
def test_gemv_bf16_on_gpu(m, n, k):
    if not small_m_path(torch.empty(m, k, device="cuda"), torch.empty(n, k, device="cuda", dtype=torch.uint8)):
        pytest.skip("needs a GPU of compute capability >= 8.9")
    wq, ws = _weight(n, k, seed=n, device="cuda")
    x = _rand(m, k, seed=m, device="cuda").to(torch.bfloat16)
    want = fp8_linear_weight_only_reference(x, wq, ws, out_dtype=torch.float32)
    y = fp8_linear(x[None], wq, ws)[0]  # the routed op, 3-D input
    assert m <= SMALL_M_MAX and y.dtype == torch.bfloat16 and not y.isnan().any()
    # exact bf16 operands, fp32 accumulation, one bf16 rounding of the output (2^-9 relative)
    err = float((y.float() - want).norm() / want.norm())
    assert err < 4e-3, err


@pytest.mark.gpu
def test_gemv_in_cuda_graph_and_compiled():
    m, n, k = 3, 576, 2048  # split-K: 9 column tiles
    if not small_m_path(torch.empty(m, k, device="cuda"), torch.empty(n, k, device="cuda", dtype=torch.uint8)):
        pytest.skip("needs a GPU of compute capability >= 8.9")
    wq, ws = _weight(n, k, seed=n, device="cuda")
    x = _rand(m, k, seed=m, device="cuda").to(torch.bfloat16)
    y = fp8_linear(x, wq, ws)
    g = torch.cuda.CUDAGraph()
    out = torch.empty_like(y)
    with torch.cuda.graph(g):
        out.copy_(fp8_linear(x, wq, ws))
    out.fill_(float("nan"))
    g.replay()
    torch.testing.assert_close(out, y, rtol=0, atol=0)
    compiled = torch.compile(lambda a: fp8_linear(a, wq, ws) * 2, fullgraph=True)
    torch.testing.assert_close(compiled(x), y * 2, rtol=0, atol=0)
