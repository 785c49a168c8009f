"""Sparse MLA prefill/decode against the PyTorch reference: invalid indices, head counts, fp8 paged cache."""
import pytest
import torch
import triton

from indexcache.kernels.sparse_mla import (dequant_latent_fp8_reference, dequant_latent_rows,
                                           quantize_latent_fp8_reference,
                                           sparse_mla_decode, sparse_mla_decode_reference,
                                           sparse_mla_decode_workspace_bytes, sparse_mla_prefill,
                                           sparse_mla_prefill_reference)
from indexcache.kernels.topk import topk_rows_reference
from tests.helpers import poison_torch_empty


@pytest.fixture(autouse=True)
def _poison_empty(monkeypatch):
    """Every buffer the kernels allocate starts as NaN (-7777 for ints), so unwritten outputs show up."""
    poison_torch_empty(monkeypatch)


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _lse_ok(l, rl, atol):
    assert torch.equal(torch.isneginf(l).cpu(), torch.isneginf(rl).cpu())
    fin = torch.isfinite(rl)
    assert torch.isfinite(l[fin]).all()
    assert (l[fin] - rl[fin]).abs().max() < atol


@pytest.mark.parametrize("h,dtype", [(16, torch.float32), (20, torch.float16), (64, torch.float32)])
def test_prefill_matches_reference(device, h, dtype):
    torch.manual_seed(h)
    T, S, K = 3, 257, 37
    q = torch.randn(T, h, 576, device=device).to(dtype)
    kv = torch.randn(S, 576, device=device).to(dtype)
    idx = torch.randint(0, S, (T, K), dtype=torch.int32, device=device)
    idx[0, 3] = -1
    idx[0, 7] = S + 11
    idx[2, :] = -1                        # no valid entry: out 0, lse -inf
    out, lse = sparse_mla_prefill(q, kv, idx, 0.0625)
    ro, rl = sparse_mla_prefill_reference(q, kv, idx, 0.0625)
    assert torch.isfinite(out).all()
    assert _rel(out, ro) < (2e-3 if dtype == torch.float16 else 1e-5)
    assert (out[2] == 0).all()
    _lse_ok(lse, rl, 1e-3)


def test_prefill_with_reference_topk_indices(device):
    # the attention fed with the top-k reference's own indices (causal: -1 padding on early rows)
    torch.manual_seed(7)
    T, h, K = 4, 16, 24
    q = torch.randn(T, h, 576, device=device)
    kv = torch.randn(40, 576, device=device)
    logits = torch.randn(T, 40, device=device)
    ends = torch.tensor([5, 17, 30, 40], dtype=torch.int32, device=device)
    idx = topk_rows_reference(logits, K, row_end=ends).to(device)
    out, lse = sparse_mla_prefill(q, kv, idx, 0.1)
    ro, rl = sparse_mla_prefill_reference(q, kv, idx, 0.1)
    assert _rel(out, ro) < 1e-5
    _lse_ok(lse, rl, 1e-4)


@pytest.mark.parametrize("h,splits", [(20, None), (16, 1), (64, 3)])
def test_decode_bf16_layout_cache(device, h, splits):
    torch.manual_seed(11 + h)
    B, nb, ps, K = 2, 6, 16, 40
    q = torch.randn(B, h, 576, device=device).half()
    cache = torch.randn(nb, ps, 576, device=device).half()
    idx = torch.randint(0, nb * ps, (B, K), dtype=torch.int32, device=device)
    idx[0, :9] = -1
    idx[1, 5] = nb * ps + 3
    out, lse = sparse_mla_decode(q, cache, idx, 0.07, num_splits=splits)
    ro, rl = sparse_mla_decode_reference(q, cache, idx, 0.07)
    assert _rel(out, ro) < 2e-3
    _lse_ok(lse, rl, 1e-3)


def test_decode_fp8_cache(device):
    torch.manual_seed(13)
    B, h, nb, ps, K = 3, 20, 5, 16, 33
    latent = torch.randn(nb, ps, 576, device=device) * torch.rand(nb, ps, 1, device=device) * 4
    cache = quantize_latent_fp8_reference(latent)
    assert cache.shape == (nb, ps, 656) and cache.dtype == torch.uint8
    deq = dequant_latent_fp8_reference(cache)
    assert _rel(deq[..., :512], latent[..., :512]) < 0.07        # e4m3 has 3 mantissa bits
    q = torch.randn(B, h, 576, device=device).half()
    idx = torch.randint(0, nb * ps, (B, K), dtype=torch.int32, device=device)
    idx[2, :] = -1
    out, lse = sparse_mla_decode(q, cache, idx, 0.07, kv_format="fp8")
    ro, rl = sparse_mla_decode_reference(q, cache, idx, 0.07, kv_format="fp8")
    assert _rel(out, ro) < 2e-3
    assert (out[2] == 0).all()
    _lse_ok(lse, rl, 1e-3)


def _fp8_case(device, B, h, nb, ps, K, seed):
    torch.manual_seed(seed)
    latent = torch.randn(nb, ps, 576, device=device) * torch.rand(nb, ps, 1, device=device) * 4
    cache = quantize_latent_fp8_reference(latent)
    q = torch.randn(B, h, 576, device=device).half()
    idx = torch.randint(0, nb * ps, (B, K), dtype=torch.int32, device=device)
    idx[0, :9] = -1
    idx[0, 11] = nb * ps + 3              # past the cache: invalid
    idx[1, 25:] = -1                      # ragged
    idx[B - 1, :] = -1                    # no valid entry
    return cache, q, idx


@pytest.mark.parametrize("h,splits,use_ws", [(16, None, False), (20, 1, True), (64, 3, True), (128, None, False),
                                             (128, 2, True)])
def test_decode_fp8_splits_and_workspace(device, h, splits, use_ws):
    B, nb, ps, K = 3, 5, 16, 41
    cache, q, idx = _fp8_case(device, B, h, nb, ps, K, seed=29 + h)
    ws = None
    if use_ws:
        n = sparse_mla_decode_workspace_bytes(B, h, K, dtype=q.dtype, kv_format="fp8", num_splits=splits)
        ws = torch.full((n,), 0xFF, dtype=torch.uint8, device=device)     # NaN bytes for fp16/fp32 views
    ro, rl = sparse_mla_decode_reference(q, cache, idx, 0.07, kv_format="fp8")
    for _ in range(2 if use_ws else 1):   # the same workspace reused by a second call
        out, lse = sparse_mla_decode(q, cache, idx, 0.07, kv_format="fp8", num_splits=splits, workspace=ws)
        assert torch.isfinite(out).all()
        assert _rel(out, ro) < 2e-3
        assert (out[B - 1] == 0).all()
        _lse_ok(lse, rl, 1e-3)
    fo, fl = sparse_mla_decode(q, cache, idx, 0.07, kv_format="fp8", num_splits=splits)
    assert _rel(out, fo) < 2e-3
    _lse_ok(lse, fl, 1e-3)


def test_decode_fp8_fp32_and_workspace_checks(device):
    B, h, nb, ps, K = 2, 20, 4, 16, 19
    cache, q, idx = _fp8_case(device, B, h, nb, ps, K, seed=3)
    q = q.float()
    out, lse = sparse_mla_decode(q, cache, idx, 0.05, kv_format="fp8")
    ro, rl = sparse_mla_decode_reference(q, cache, idx, 0.05, kv_format="fp8")
    assert _rel(out, ro) < 1e-5
    _lse_ok(lse, rl, 1e-4)
    n = sparse_mla_decode_workspace_bytes(B, h, K, dtype=q.dtype, kv_format="fp8")
    with pytest.raises(ValueError, match="workspace"):
        sparse_mla_decode(q, cache, idx, 0.05, kv_format="fp8",
                          workspace=torch.zeros(n // 2, dtype=torch.uint8, device=device))
    # the workspace also serves the split partials
    qh = q.half()
    n = sparse_mla_decode_workspace_bytes(B, h, K, dtype=qh.dtype, kv_format="fp8", num_splits=2)
    o2, l2 = sparse_mla_decode(qh, cache, idx, 0.05, kv_format="fp8", num_splits=2,
                               workspace=torch.full((n,), 0xFF, dtype=torch.uint8, device=device))
    assert _rel(o2, ro) < 2e-3
    _lse_ok(l2, rl, 1e-3)


def _fp8_prefill_case(device, T, h, S, K, seed, dtype):
    torch.manual_seed(seed)
    # rows of very different magnitudes, so the four tile scales of a row and of different rows differ
    latent = torch.randn(S, 576, device=device) * torch.rand(S, 1, device=device) * 4
    latent[:, 128:256] *= 0.01
    kv = quantize_latent_fp8_reference(latent)
    q = (torch.randn(T, h, 576, device=device) * torch.rand(1, h, 1, device=device) * 3).to(dtype)
    idx = torch.randint(0, S, (T, K), dtype=torch.int32, device=device)
    idx[0, 3] = -1
    idx[0, 7] = S + 11                    # past the cache: skipped
    idx[1, K // 2:] = -1                  # ragged: a -1 padded tail
    idx[T - 1, :] = -1                    # no valid entry: out 0, lse -inf
    return q, kv, idx


# exact in the interpreter's fp32; fp16 q: fp16 output rounding
@pytest.mark.parametrize("h,dtype,tol", [(16, torch.float32, 1e-5), (20, torch.float32, 1e-5), (80, torch.float32, 1e-5),
                                         (9, torch.float16, 2e-3), (20, torch.bfloat16, 1e-2)])
def test_prefill_fp8_matches_reference(device, h, dtype, tol):
    T, S, K = 4, 211, 37                  # K not a multiple of the token tile: masked tail
    q, kv, idx = _fp8_prefill_case(device, T, h, S, K, seed=100 + h, dtype=dtype)
    out, lse = sparse_mla_prefill(q, kv, idx, 0.0625, kv_format="fp8", backend="triton")
    ro, rl = sparse_mla_prefill_reference(q, kv, idx, 0.0625, kv_format="fp8")
    assert out.shape == (T, h, 512) and out.dtype == dtype and lse.shape == (T, h)
    assert torch.isfinite(out).all()
    assert _rel(out[:T - 1], ro[:T - 1]) < tol
    assert (out[T - 1] == 0).all()
    _lse_ok(lse, rl, 1e-3 if tol < 1e-3 else 2e-2)


def test_prefill_fp8_paged_equals_bf16_kernel_on_dequantised_rows(device):
    # the same attention as the bf16-cache kernel fed the dequantised rows (exact in fp32), paged cache accepted
    T, h, S, K = 3, 20, 96, 29
    q, kv, idx = _fp8_prefill_case(device, T, h, S, K, seed=5, dtype=torch.float32)
    out, lse = sparse_mla_prefill(q, kv.view(6, 16, 656), idx, 0.1, kv_format="fp8", backend="triton")
    bo, bl = sparse_mla_prefill(q, dequant_latent_fp8_reference(kv), idx, 0.1)
    assert _rel(out[:T - 1], bo[:T - 1]) < 1e-5
    _lse_ok(lse, bl, 1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_dequant_latent_rows_equals_reference(device, dtype):
    # ragged slot list (not a multiple of the 16-row program), invalid slots (-1, past the paged cache) give zero
    # rows; the power-of-two scales make the rows exact in every float dtype
    _, kv, _ = _fp8_prefill_case(device, 2, 4, 96, 8, seed=8, dtype=torch.float32)
    paged = kv.view(6, 16, 656)
    slots = torch.randint(0, 96, (37,), device=device)
    slots[[0, 5, 36]] = torch.tensor([-1, 96, 95], device=device)
    for s in (slots, slots.to(torch.int32)):
        rows = dequant_latent_rows(paged, s, dtype)
        ref = dequant_latent_fp8_reference(kv)[s.clamp(0, 95).long()]
        ref[[0, 5]] = 0
        assert rows.shape == (37, 576) and rows.dtype == dtype
        assert torch.equal(rows.float(), ref.to(dtype).float())
    assert dequant_latent_rows(paged, slots[:0], dtype).shape == (0, 576)


def test_dequant_latent_rows_bad_arguments():
    kv = torch.zeros(10, 656, dtype=torch.uint8)
    with pytest.raises(ValueError, match="uint8"):
        dequant_latent_rows(kv.float(), torch.zeros(3, dtype=torch.int32), torch.bfloat16)
    with pytest.raises(ValueError, match="slots must be int32/int64"):
        dequant_latent_rows(kv, torch.zeros(3, 1, dtype=torch.int32), torch.bfloat16)
    with pytest.raises(ValueError, match="dtype must be"):
        dequant_latent_rows(kv, torch.zeros(3, dtype=torch.int32), torch.int8)


@pytest.mark.parametrize("h,dtype,tol", [(20, torch.float32, 1e-5), (20, torch.bfloat16, 1e-2)])
def test_prefill_fp8_dequant_backend_matches_reference(device, h, dtype, tol):
    T, S, K = 4, 211, 37
    q, kv, idx = _fp8_prefill_case(device, T, h, S, K, seed=300 + h, dtype=dtype)
    out, lse = sparse_mla_prefill(q, kv, idx, 0.0625, kv_format="fp8", backend="dequant")
    ro, rl = sparse_mla_prefill_reference(q, kv, idx, 0.0625, kv_format="fp8")
    assert out.shape == (T, h, 512) and out.dtype == dtype
    assert torch.isfinite(out).all() and (out[T - 1] == 0).all()
    assert _rel(out[:T - 1], ro[:T - 1]) < tol
    _lse_ok(lse, rl, 1e-3 if tol < 1e-3 else 2e-2)


def test_prefill_fp8_bad_arguments():
    q = torch.randn(2, 16, 576)
    kv = torch.zeros(10, 656, dtype=torch.uint8)
    idx = torch.zeros(2, 4, dtype=torch.int32)
    with pytest.raises(ValueError, match="kv_format"):
        sparse_mla_prefill(q, kv, idx, 0.1, kv_format="int8")
    with pytest.raises(ValueError, match="656"):
        sparse_mla_prefill(q, torch.zeros(10, 576, dtype=torch.uint8), idx, 0.1, kv_format="fp8")
    with pytest.raises(ValueError, match="uint8"):
        sparse_mla_prefill(q, kv.float(), idx, 0.1, kv_format="fp8")
    with pytest.raises(ValueError, match="contiguous"):
        sparse_mla_prefill(q, torch.zeros(10, 700, dtype=torch.uint8)[:, :656], idx, 0.1, kv_format="fp8")
    with pytest.raises(ValueError, match="int32"):
        sparse_mla_prefill(q, kv, idx.long(), 0.1, kv_format="fp8")
    with pytest.raises(ValueError, match="backend 'dequant' needs kv_format 'fp8'"):
        sparse_mla_prefill(q, torch.zeros(10, 576), idx, 0.1, backend="dequant")


class _FitsOneStage:
    """A stand-in for a Triton kernel launch: raises OutOfResources unless num_stages <= ``fits``; records the
    (num_stages) of each attempt."""

    def __init__(self, fits):
        self.fits, self.tried = fits, []

    def __getitem__(self, grid):
        def launch(*args, BT, num_warps, num_stages, **kw):
            self.tried.append(num_stages)
            if num_stages > self.fits:
                raise triton.runtime.errors.OutOfResources(300000, 232448, "shared memory")
        return launch


@pytest.mark.parametrize("every_step,first_try,later", [(False, [2, 1], [1]), (True, [3, 3, 2, 1], [1])])
def test_launch_fallback_is_remembered_without_touching_the_config(every_step, first_try, later):
    """A launch that does not fit steps down (32-token tiles, fewer stages), the step that fitted is where the
    next launch of the same kind starts, and the caller's config dict (a module-level one in use) is unchanged."""
    from indexcache.kernels.sparse_mla import ops

    cfg = {"hb_max": 64, "bt": 64, "num_warps": 8, "num_stages": 3 if every_step else 2}
    before = dict(cfg)
    k = _FitsOneStage(fits=1)
    x = torch.zeros(1)
    ops._launch(k, (1,), (x,), {"HB": 64}, cfg, every_step=every_step)
    assert k.tried == first_try and cfg == before
    k.tried.clear()
    ops._launch(k, (1,), (x,), {"HB": 64}, cfg, every_step=every_step)
    assert k.tried == later and cfg == before
    k.tried.clear()                                   # another kind of launch (other constexprs) starts again
    ops._launch(k, (1,), (x,), {"HB": 32}, cfg, every_step=every_step)
    assert k.tried == first_try
    with pytest.raises(triton.runtime.errors.OutOfResources):
        ops._launch(_FitsOneStage(fits=0), (1,), (x,), {"HB": 64}, cfg, every_step=every_step)


def test_bad_arguments():
    q = torch.randn(2, 16, 576)
    kv = torch.randn(10, 576)
    idx = torch.zeros(2, 4, dtype=torch.int32)
    with pytest.raises(ValueError, match="576"):
        sparse_mla_prefill(torch.randn(2, 16, 512), kv, idx, 0.1)
    with pytest.raises(ValueError, match="int32"):
        sparse_mla_prefill(q, kv, idx.long(), 0.1)
    with pytest.raises(ValueError, match="d_v"):
        sparse_mla_prefill(q, kv, idx, 0.1, d_v=256)
    with pytest.raises(ValueError, match="kv_format"):
        sparse_mla_decode(q, kv.view(1, 10, 576), idx, 0.1, kv_format="int8")
    with pytest.raises(ValueError, match="656"):
        sparse_mla_decode(q, torch.zeros(1, 10, 576, dtype=torch.uint8), idx, 0.1, kv_format="fp8")


@pytest.mark.gpu
@pytest.mark.parametrize("h,dtype", [(64, torch.float32), (20, torch.float32), (128, torch.float16)])
def test_gpu_prefill_every_row_width_launches(h, dtype):
    """fp32 rows at 64 heads raised OutOfResources on the H200 (280 KB of shared memory after the launcher's
    fallback); now 32 heads a program at 32-token tiles. Against the reference, NaN-poisoned outputs, ragged
    lists."""
    torch.manual_seed(h)
    T, S, K = 9, 5000, 300
    q = torch.randn(T, h, 576, device="cuda").to(dtype)
    kv = torch.randn(S, 576, device="cuda").to(dtype)
    idx = torch.randint(0, S, (T, K), dtype=torch.int32, device="cuda")
    idx[:, -40:] = -1
    idx[4] = -1
    out, lse = sparse_mla_prefill(q, kv, idx, 0.0625)
    ro, rl = sparse_mla_prefill_reference(q, kv, idx, 0.0625)
    assert torch.isfinite(out).all() and (out[4] == 0).all()
    assert _rel(out, ro) < 3e-3  # fp32 rows go through tf32 tensor-core dots on the GPU
    _lse_ok(lse, rl, 1e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["bf16", "fp8"])
def test_gpu_decode_fp32_q_at_64_heads(fmt):
    """fp32 q with more than 32 heads raised OutOfResources in decode too (64 heads a program); now 32, and the
    bf16 launches keep their config (the fallback no longer rewrites the shared one)."""
    from indexcache.kernels.sparse_mla import ops

    before = {k: dict(v) for k, v in ops.DECODE_CFG.items()}
    torch.manual_seed(5)
    nb, ps, B, h, K = 40, 64, 3, 64, 300
    lat = torch.randn(nb, ps, 576, device="cuda")
    cache = lat if fmt == "bf16" else quantize_latent_fp8_reference(lat)
    q = torch.randn(B, h, 576, device="cuda")
    idx = torch.randint(0, nb * ps, (B, K), dtype=torch.int32, device="cuda")
    idx[1, -50:] = -1
    o, l = sparse_mla_decode(q, cache, idx, 0.0625, kv_format=fmt)
    ro, rl = sparse_mla_decode_reference(q, cache, idx, 0.0625, kv_format=fmt)
    assert _rel(o, ro) < 3e-3  # tf32 dots
    _lse_ok(l, rl, 1e-2)
    assert ops.DECODE_CFG == before


@pytest.mark.gpu
@pytest.mark.parametrize("h", [20, 128])
def test_gpu_bf16_real_sizes(h):
    torch.manual_seed(17)
    T, S, K = 64, 200_000, 2048
    q = torch.randn(T, h, 576, device="cuda", dtype=torch.bfloat16)
    kv = torch.randn(S, 576, device="cuda", dtype=torch.bfloat16)
    idx = torch.randint(0, S, (T, K), dtype=torch.int32, device="cuda")
    idx[:, -100:] = -1
    out, lse = sparse_mla_prefill(q, kv, idx, 0.0625)
    ro, rl = sparse_mla_prefill_reference(q, kv, idx, 0.0625)
    assert _rel(out, ro) < 1e-2
    _lse_ok(lse, rl, 2e-2)
    nb, ps, B = 3200, 64, 8
    lat = torch.randn(nb, ps, 576, device="cuda")
    idx = torch.randint(0, nb * ps, (B, K), dtype=torch.int32, device="cuda")
    qd = q[:B]
    for fmt, cache in (("bf16", lat.bfloat16()), ("fp8", quantize_latent_fp8_reference(lat))):
        o, l = sparse_mla_decode(qd, cache, idx, 0.0625, kv_format=fmt)
        ro, rl = sparse_mla_decode_reference(qd, cache, idx, 0.0625, kv_format=fmt)
        assert _rel(o, ro) < 1e-2, fmt
        _lse_ok(l, rl, 2e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("h", [20, 128])
def test_gpu_fp8_decode_workspace_real_sizes(h):
    torch.manual_seed(19)
    B, K = 8, 2048
    q = torch.randn(B, h, 576, device="cuda", dtype=torch.bfloat16)
    nb, ps = 3200, 64
    cache = quantize_latent_fp8_reference(torch.randn(nb, ps, 576, device="cuda"))
    idx = torch.randint(0, nb * ps, (B, K), dtype=torch.int32, device="cuda")
    idx[1, 700:] = -1
    idx[2] = -1
    qd = q[:B]
    ro, rl = sparse_mla_decode_reference(qd, cache, idx, 0.0625, kv_format="fp8")
    ws = torch.empty(sparse_mla_decode_workspace_bytes(B, h, K, kv_format="fp8"),
                     dtype=torch.uint8, device="cuda")
    for w in (None, ws):
        o, l = sparse_mla_decode(qd, cache, idx, 0.0625, kv_format="fp8", workspace=w)
        assert _rel(o, ro) < 1e-2
        _lse_ok(l, rl, 2e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("h", [20, 128])
def test_gpu_prefill_fp8_real_sizes(h):
    torch.manual_seed(23)
    T, S, K = 64, 200_000, 2048
    q = torch.randn(T, h, 576, device="cuda", dtype=torch.bfloat16)
    kv = quantize_latent_fp8_reference(torch.randn(S, 576, device="cuda") * torch.rand(S, 1, device="cuda") * 4)
    idx = torch.randint(0, S, (T, K), dtype=torch.int32, device="cuda")
    idx[:, -100:] = -1
    idx[3, 1000:] = S + 5
    idx[5] = -1
    ro, rl = sparse_mla_prefill_reference(q, kv, idx, 0.0625, kv_format="fp8")
    for backend in ("triton", "dequant"):
        out, lse = sparse_mla_prefill(q, kv, idx, 0.0625, kv_format="fp8", backend=backend)
        assert torch.isfinite(out).all()
        assert (out[5] == 0).all()
        assert _rel(out, ro) < 1e-2
        _lse_ok(lse, rl, 2e-2)


# ------------------------------------------------------------------------------- Gluon FP8 prefill (kernels/gluon.py)
def test_prefill_gluon_bad_arguments():
    q = torch.randn(2, 16, 576)
    kv8 = torch.zeros(10, 656, dtype=torch.uint8)
    idx = torch.zeros(2, 4, dtype=torch.int32)
    with pytest.raises(ValueError, match="backend must be 'auto', 'triton', 'gluon' or 'dequant', got 'cuda'"):
        sparse_mla_prefill(q, kv8, idx, 0.1, kv_format="fp8", backend="cuda")
    with pytest.raises(ValueError, match="backend 'gluon' needs kv_format 'fp8', got 'bf16'"):
        sparse_mla_prefill(q, torch.randn(10, 576), idx, 0.1, backend="gluon")
    with pytest.raises(ValueError, match="backend 'gluon' needs CUDA tensors"):
        sparse_mla_prefill(q, kv8, idx, 0.1, kv_format="fp8", backend="gluon")
    # one launch: config keys (the removed schedule / num_stages among them) are named, not ignored
    with pytest.raises(ValueError, match="'gluon' takes no config keys .*got \\['num_stages', 'schedule'\\]"):
        sparse_mla_prefill(q, kv8, idx, 0.1, kv_format="fp8", backend="gluon",
                           config={"schedule": "serial", "num_stages": 2})
    with pytest.raises(ValueError, match="656"):       # the FP8 cache checks come first
        sparse_mla_prefill(q, torch.zeros(10, 576, dtype=torch.uint8), idx, 0.1, kv_format="fp8", backend="gluon")


def test_prefill_gluon_compiles_for_sm90_without_spills():
    """The Gluon kernel at the 20-head launch, lowered for sm_90a in a subprocess without the interpreter
    (``sm90_compile --sparse-mla-gluon``): no spills, wgmma not serialised by ptxas, 100 wgmma (the 68 of a tile
    in the main loop: 32 QK, 4 rope, 32 PV; + one PV of zeros before it), shared memory within an SM's 227 KB,
    and the loop's cp.async wait leaving NUM_STAGES - 2 tiles in flight at the top of a tile (the stage that held
    P^T is refilled after its PV)."""
    import json
    import os
    import subprocess
    import sys

    from indexcache.kernels.sparse_mla import gluon as sg
    from tests.kernels.sm90_compile import ptxas_path

    if ptxas_path() is None:
        pytest.skip("this Triton has no bundled ptxas")
    code = ("import json\nfrom tests.kernels.sm90_compile import sparse_mla_gluon_kernels as k\n"
            "for _, r in k(): print(json.dumps(r))")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    rows = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    assert len(rows) == 1, r.stdout
    row = rows[0]
    assert row["spill_bytes"] == 0 and not row["wgmma_serialized"], row
    assert row["wgmma"] == 100 and row["shared_bytes"] <= 232448, row
    if row["loop_hgmma"]:                                 # machine code available (bundled cuobjdump)
        assert row["loop_hgmma"] == 68 and row["loop_cp_async_waits"] == [sg.NUM_STAGES - 2], row


def test_prefill_launches_fit_an_sm90_shared_memory():
    """The bf16-cache prefill's and the decode's launches per row width and head count, lowered for sm_90a without
    the interpreter: each fits the 227 KB of an H100 / H200 SM (fp32 rows at 64 heads a program needed 280 KB even
    after the launchers' fallbacks and raised OutOfResources on the GPU)."""
    import os
    import subprocess
    import sys

    from tests.kernels.sm90_compile import ptxas_path

    if ptxas_path() is None:
        pytest.skip("this Triton has no bundled ptxas")
    code = ("from tests.kernels.sm90_compile import compile_sm90\n"
            "from indexcache.kernels.sparse_mla import ops, triton as tm\n"
            "def show(fn, dt, h, cfg, hb, **ce):\n"
            "    ty = {n: '*' + dt for n in ('q', 'kv', 'cache', 'out')}\n"
            "    ty.update(idx='*i32', lse='*fp32', qk_scale='fp32')\n"
            "    r = compile_sm90(fn, ty, {'HB': hb, 'BT': cfg['bt'], 'UPCAST': False, **ce},\n"
            "                     num_warps=cfg['num_warps'], num_stages=cfg['num_stages'])\n"
            "    print(dt, h, hb, r['shared_bytes'])\n"
            "for dt, h in (('fp32', 64), ('fp32', 20), ('bf16', 128), ('bf16', 20)):\n"
            "    cfg, hb = ops._prefill_bf16_launch(h, 4 if dt == 'fp32' else 2, None)\n"
            "    show(tm._sparse_mla_prefill_kernel, dt, h, cfg, hb)\n"
            "for dt, h, fmt in (('fp32', 64, 'bf16'), ('fp32', 64, 'fp8'), ('bf16', 64, 'bf16'), ('bf16', 64, 'fp8')):\n"
            "    cfg, hb, _, _, _ = ops._decode_plan(1, h, 2048, fmt, None, itemsize=4 if dt == 'fp32' else 2)\n"
            "    show(tm._sparse_mla_decode_kernel, dt, h, cfg, hb, DIRECT=True, HEAD_MAJOR=fmt == 'fp8')\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    r = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    rows = [line.split() for line in r.stdout.splitlines()]
    assert [(dt, h) for dt, h, _, _ in rows] == [("fp32", "64"), ("fp32", "20"), ("bf16", "128"), ("bf16", "20"),
                                               ("fp32", "64"), ("fp32", "64"), ("bf16", "64"), ("bf16", "64")]
    for dt, h, hb, shared in rows:
        assert int(shared) <= 232448, (dt, h, hb, shared)


def _gluon_vs_reference(q, kv, idx, scale, tol=1e-2):
    """The Gluon kernel against the reference (fp16 P^T and q: ~1e-3), rows without a valid index out 0 and lse
    -inf (the Triton kernels' rule), every output written (torch.empty is NaN-poisoned)."""
    out, lse = sparse_mla_prefill(q, kv, idx, scale, kv_format="fp8", backend="gluon")
    ro, rl = sparse_mla_prefill_reference(q, kv, idx, scale, kv_format="fp8")
    assert out.shape == ro.shape and out.dtype == q.dtype and lse.shape == rl.shape
    assert torch.isfinite(out).all()
    empty = ((idx < 0) | (idx >= kv.reshape(-1, 656).shape[0])).all(1)
    assert empty.any() and (out[empty] == 0).all() and torch.isneginf(lse[empty]).all()
    assert _rel(out[~empty], ro[~empty]) < tol
    _lse_ok(lse, rl, 2e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("T,h,S,K,dtype", [
    (5, 20, 211, 37, torch.bfloat16),        # K < one tile, odd T, the preset's heads
    (7, 20, 3000, 200, torch.bfloat16),      # K not a multiple of 64
    (3, 16, 500, 130, torch.float16),        # one 16-head block
    (4, 9, 300, 64, torch.float32),          # heads padded in a 16-head block, fp32 q / out
    (3, 40, 700, 300, torch.bfloat16),       # two 32-head blocks
    (6, 20, 90, 500, torch.bfloat16),        # more tiles than rows (repeated rows)
])
def test_gpu_prefill_fp8_gluon_matches_reference(T, h, S, K, dtype):
    q, kv, idx = _fp8_prefill_case("cuda", T, h, S, K, seed=300 + h + K, dtype=dtype)
    _gluon_vs_reference(q, kv, idx, 0.0625)


@pytest.mark.gpu
def test_gpu_prefill_fp8_gluon_paged_real_size():
    torch.manual_seed(31)
    T, h, S, K = 63, 20, 200_000, 2048
    q = torch.randn(T, h, 576, device="cuda", dtype=torch.bfloat16)
    lat = torch.randn(S, 576, device="cuda") * torch.rand(S, 1, device="cuda") * 4
    lat[:, 256:384] *= 0.003                      # tile scales of a row ~2^8 apart
    kv = quantize_latent_fp8_reference(lat).view(S // 64, 64, 656)
    idx = torch.randint(0, S, (T, K), dtype=torch.int32, device="cuda")
    idx[:, -100:] = -1                            # ragged -1 tails
    idx[3, 1000:] = S + 5                         # past the cache
    idx[5] = -1                                   # no valid index
    idx[9, :1500] = -1                            # valid entries only at the end
    _gluon_vs_reference(q, kv, idx, 0.0625)
    with pytest.raises(ValueError, match="takes no config keys .*got \\['stages'\\]"):
        sparse_mla_prefill(q, kv, idx, 0.0625, kv_format="fp8", backend="gluon", config={"stages": 3})
