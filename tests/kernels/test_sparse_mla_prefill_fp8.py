"""Sparse MLA prefill straight from the FP8 latent rows against the PyTorch reference (dequantised rows): ragged
and masked index rows, head counts that need head masking or two head blocks, NaN-poisoned outputs."""
import pytest
import torch

from indexcache.kernels.sparse_mla import (quantize_latent_fp8_reference, sparse_mla_prefill,
                                           sparse_mla_prefill_fp8, sparse_mla_prefill_fp8_reference)
from indexcache.kernels.sparse_mla.reference import dequant_latent_fp8_reference
from tests.helpers import poisoned


@pytest.fixture(autouse=True)
def _poison_empty(monkeypatch):
    """Every buffer the kernel allocates starts as NaN, so unwritten outputs show up."""
    def empty(*shape, dtype=None, device=None, **kw):
        shape = tuple(shape[0]) if len(shape) == 1 and isinstance(shape[0], (tuple, list, torch.Size)) else shape
        return poisoned(shape, dtype or torch.get_default_dtype(), device or "cpu")

    monkeypatch.setattr(torch, "empty", empty)


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _lse_ok(l, rl, atol):
    assert torch.equal(torch.isneginf(l).cpu(), torch.isneginf(rl).cpu())
    fin = torch.isfinite(rl)
    assert torch.isfinite(l[fin]).all()
    assert (l[fin] - rl[fin]).abs().max() < atol


def _case(device, T, h, S, K, seed, dtype):
    torch.manual_seed(seed)
    # rows of very different magnitudes, so the four tile scales of a row and of different rows differ
    latent = torch.randn(S, 576, device=device) * torch.rand(S, 1, device=device) * 4
    latent[:, 128:256] *= 0.01
    kv = quantize_latent_fp8_reference(latent)
    q = torch.randn(T, h, 576, device=device).to(dtype)
    idx = torch.randint(0, S, (T, K), dtype=torch.int32, device=device)
    idx[0, 3] = -1
    idx[0, 7] = S + 11                    # past the cache: skipped
    idx[1, K // 2:] = -1                  # fewer than K valid (ragged, -1 padded tail)
    idx[T - 1, :] = -1                    # no valid entry: out 0, lse -inf
    return q, kv, idx


@pytest.mark.parametrize("h,dtype", [(16, torch.float32), (20, torch.float32), (64, torch.float32),
                                     (80, torch.float32)])
def test_prefill_fp8_matches_reference(device, h, dtype):
    T, S, K = 4, 211, 37                  # K not a multiple of the token tile: masked tail
    q, kv, idx = _case(device, T, h, S, K, seed=100 + h, dtype=dtype)
    out, lse = sparse_mla_prefill_fp8(q, kv, idx, 0.0625)
    ro, rl = sparse_mla_prefill_fp8_reference(q, kv, idx, 0.0625)
    assert out.shape == (T, h, 512) and out.dtype == dtype and lse.shape == (T, h)
    assert torch.isfinite(out).all()
    assert _rel(out[:T - 1], ro[:T - 1]) < 1e-5
    assert (out[T - 1] == 0).all()
    _lse_ok(lse, rl, 1e-3)


def test_prefill_fp8_equals_bf16_kernel_on_dequantised_rows(device):
    # the same attention as the bf16-cache kernel fed the dequantised rows (exact in fp32), paged cache accepted
    T, h, S, K = 3, 20, 96, 29
    q, kv, idx = _case(device, T, h, S, K, seed=5, dtype=torch.float32)
    out, lse = sparse_mla_prefill_fp8(q, kv.view(6, 16, 656), idx, 0.1)
    bo, bl = sparse_mla_prefill(q, dequant_latent_fp8_reference(kv), idx, 0.1)
    assert _rel(out[:T - 1], bo[:T - 1]) < 1e-5
    _lse_ok(lse, bl, 1e-4)


def test_prefill_fp8_bad_arguments():
    q = torch.randn(2, 16, 576)
    kv = torch.zeros(10, 656, dtype=torch.uint8)
    idx = torch.zeros(2, 4, dtype=torch.int32)
    with pytest.raises(ValueError, match="656"):
        sparse_mla_prefill_fp8(q, torch.zeros(10, 576, dtype=torch.uint8), idx, 0.1)
    with pytest.raises(ValueError, match="uint8"):
        sparse_mla_prefill_fp8(q, kv.float(), idx, 0.1)
    with pytest.raises(ValueError, match="contiguous"):
        sparse_mla_prefill_fp8(q, torch.zeros(10, 700, dtype=torch.uint8)[:, :656], idx, 0.1)
    with pytest.raises(ValueError, match="int32"):
        sparse_mla_prefill_fp8(q, kv, idx.long(), 0.1)
    with pytest.raises(ValueError, match="d_v"):
        sparse_mla_prefill_fp8(q, kv, idx, 0.1, d_v=256)
    with pytest.raises(ValueError, match="bf16 or fp32"):
        sparse_mla_prefill_fp8(q.half(), kv, idx, 0.1)


@pytest.mark.gpu
@pytest.mark.parametrize("h", [20, 64, 128])
def test_gpu_prefill_fp8_real_sizes(h):
    torch.manual_seed(23)
    T, S, K = 64, 200_000, 2048
    q = torch.randn(T, h, 576, device="cuda", dtype=torch.bfloat16)
    kv = quantize_latent_fp8_reference(torch.randn(S, 576, device="cuda") * torch.rand(S, 1, device="cuda") * 4)
    idx = torch.randint(0, S, (T, K), dtype=torch.int32, device="cuda")
    idx[:, -100:] = -1
    idx[3, 1000:] = S + 5
    idx[5] = -1
    out, lse = sparse_mla_prefill_fp8(q, kv, idx, 0.0625)
    ro, rl = sparse_mla_prefill_fp8_reference(q, kv, idx, 0.0625)
    assert torch.isfinite(out).all()
    assert (out[5] == 0).all()
    assert _rel(out, ro) < 1e-2
    _lse_ok(lse, rl, 2e-2)
