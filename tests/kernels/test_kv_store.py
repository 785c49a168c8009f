"""Cache writes: Triton (interpreter on CPU) vs PyTorch references, byte for byte."""
import pytest
import torch

from indexcache.kernels.formats import quantize_rows
from indexcache.kernels.indexer.reference import hadamard_128
from indexcache.kernels.kv_store import (
    dequant_latent_fp8,
    gather_indexer_k,
    new_indexer_cache,
    store_indexer_k,
    store_latent_bf16,
    store_latent_fp8,
)
from indexcache.kernels.kv_store.reference import (
    store_indexer_k_ref,
    store_latent_bf16_ref,
    store_latent_fp8_ref,
)


def _slots(t, capacity, device, seed=0, skip=(1, 5)):
    g = torch.Generator().manual_seed(seed)
    s = torch.randperm(capacity, generator=g)[:t]
    for i in skip:
        if i < t:
            s[i] = -1
    return s.to(device)


def _garbage(shape, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, shape, generator=g, dtype=torch.uint8).to(device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("hadamard", [False, True])
def test_store_indexer_k_bytes_match_reference(dtype, hadamard, device):
    t, pages = 37, 3
    g = torch.Generator().manual_seed(1)
    k = (torch.randn(t, 128, generator=g) * torch.rand(t, 1, generator=g) * 20).to(dtype).to(device)
    k[3] = 0.0  # amax floor
    k[4, :7] = torch.tensor([1e-6, -3e-5, 2e-3, 448.0, -0.5, 5e-4, 1.0])  # subnormal e4m3 codes after scaling
    slots = _slots(t, pages * 64, device)
    got = _garbage((pages, 8448), device)
    want = got.clone()
    store_indexer_k(got, slots, k, hadamard=hadamard)
    store_indexer_k_ref(want, slots, k, hadamard=hadamard)
    assert torch.equal(got, want)
    keep = slots >= 0
    k8, ks = gather_indexer_k(got, slots[keep])
    kk = (hadamard_128(k.float()) if hadamard else k.float())[keep]
    assert ((k8.float() * ks[:, None] - kk).abs() <= kk.abs().amax(-1, keepdim=True) * 2**-4 + 1e-6).all()


def test_e4m3_emulation_exhaustive_grid(device):
    """The kernel's cast (emulated under the interpreter, hardware on GPU) equals torch's RNE satfinite cast."""
    vals = torch.cat([torch.linspace(-448, 448, 4001), torch.logspace(-12, 8.8, 2000, base=2.0),
                      -torch.logspace(-12, 8.8, 2000, base=2.0)])
    # also all midpoints between neighbouring e4m3 codes (ties to even)
    codes = torch.arange(0, 127, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    mids = (codes[1:] + codes[:-1]) / 2
    vals = torch.cat([vals, mids, -mids, codes, -codes]).clamp(-448, 448)
    n = (len(vals) // 128 + 1) * 128
    x = torch.zeros(n).index_copy_(0, torch.arange(len(vals)), vals).view(-1, 128)
    x[:, 0] = 448.0  # pin every row's scale to 1 so the stored codes are cast(x) itself
    cache = new_indexer_cache((x.shape[0] + 63) // 64, device)
    slots = torch.arange(x.shape[0], device=device)
    store_indexer_k(cache, slots, x.to(device))
    k8, ks = gather_indexer_k(cache, slots)
    assert (ks == 1.0).all()
    assert torch.equal(k8.view(torch.uint8).cpu(), x.to(torch.float8_e4m3fn).view(torch.uint8))


def test_store_indexer_k_bad_inputs():
    cache = new_indexer_cache(2)
    with pytest.raises(ValueError, match="kv_cache"):
        store_indexer_k(cache.view(2, 64, 132), torch.zeros(1, dtype=torch.long), torch.randn(1, 128))
    with pytest.raises(ValueError, match="k must be"):
        store_indexer_k(cache, torch.zeros(1, dtype=torch.long), torch.randn(1, 64))
    with pytest.raises(ValueError, match="slot_mapping"):
        store_indexer_k(cache, torch.zeros(2, dtype=torch.long), torch.randn(1, 128))


@pytest.mark.parametrize("kpe_dtype", [torch.bfloat16, torch.float32])
def test_store_latent_fp8_matches_reference(kpe_dtype, device):
    t, blocks, page = 21, 2, 16
    g = torch.Generator().manual_seed(2)
    ckv = (torch.randn(t, 512, generator=g) * torch.rand(t, 512, generator=g).pow(4) * 30).to(device)
    ckv[2, 128:256] = 0.0
    kpe = torch.randn(t, 64, generator=g).to(kpe_dtype).to(device)
    if kpe_dtype == torch.float32:
        kpe = kpe.bfloat16().float()  # exactly representable: interpreter fp32->bf16 stores truncate
    slots = _slots(t, blocks * page, device, seed=3)
    got = _garbage((blocks, page, 656), device, seed=4)
    want = got.clone()
    store_latent_fp8(got, slots, ckv, kpe)
    store_latent_fp8_ref(want, slots, ckv, kpe)
    assert torch.equal(got, want)
    keep = slots >= 0
    rows = got.view(-1, 656)[slots[keep]]
    deq = dequant_latent_fp8(rows)
    ref = ckv[keep].float().view(-1, 4, 128)
    err = (deq[:, :512].view(-1, 4, 128) - ref).abs()
    assert (err <= ref.abs().amax(-1, keepdim=True) * 2**-4 + 1e-6).all()
    assert torch.equal(deq[:, 512:], kpe[keep].float())
    scales = rows[:, 512:528].contiguous().view(torch.float32)
    torch.testing.assert_close(torch.log2(scales), torch.log2(scales).round())


def test_store_latent_bf16_matches_reference(device):
    t, blocks, page = 19, 3, 8
    g = torch.Generator().manual_seed(5)
    ckv = torch.randn(t, 512, generator=g).bfloat16().to(device)
    kpe = torch.randn(t, 64, generator=g).bfloat16().to(device)
    slots = _slots(t, blocks * page, device, seed=6)
    got = torch.full((blocks, page, 576), float("nan"), dtype=torch.bfloat16, device=device)
    want = got.clone()
    store_latent_bf16(got, slots, ckv, kpe)
    store_latent_bf16_ref(want, slots, ckv, kpe)
    assert torch.equal(got.isnan(), want.isnan())
    assert torch.equal(torch.nan_to_num(got), torch.nan_to_num(want))
    keep = slots >= 0
    assert torch.equal(got.view(-1, 576)[slots[keep]], torch.cat([ckv, kpe], 1)[keep])


def test_latent_bad_inputs():
    cache = torch.zeros(2, 4, 656, dtype=torch.uint8)
    s = torch.zeros(3, dtype=torch.long)
    with pytest.raises(ValueError, match="ckv"):
        store_latent_fp8(cache, s, torch.randn(3, 500), torch.randn(3, 64))
    with pytest.raises(ValueError, match="kpe"):
        store_latent_fp8(cache, s, torch.randn(3, 512), torch.randn(3, 32))
    with pytest.raises(ValueError, match="cache"):
        store_latent_bf16(cache, s, torch.randn(3, 512), torch.randn(3, 64))
    with pytest.raises(ValueError, match="656"):
        dequant_latent_fp8(torch.zeros(3, 600, dtype=torch.uint8))


def test_quantize_rows_power_of_two_edges():
    x = torch.tensor([[448.0] + [0.0] * 127, [448.0 * 1.0000001] + [0.0] * 127, [1e-9] * 128])
    q, s = quantize_rows(x)
    assert s[0] == 1.0 and s[1] == 2.0 and s[2] == 2.0 ** -22  # 1e-4/448 -> 2^-22
    assert q.float().abs().max() <= 448


@pytest.mark.gpu
def test_gpu_store_bf16_inputs_real_size():
    t, pages = 8192, 200
    k = torch.randn(t, 128, device="cuda", dtype=torch.bfloat16) * 3
    slots = torch.randperm(pages * 64, device="cuda")[:t]
    slots[::7] = -1
    a = _garbage((pages, 8448), "cuda")
    b = a.clone()
    store_indexer_k(a, slots, k, hadamard=True)
    store_indexer_k_ref(b, slots, k, hadamard=True)
    assert torch.equal(a, b)
    ckv = torch.randn(t, 512, device="cuda", dtype=torch.bfloat16)
    kpe = torch.randn(t, 64, device="cuda", dtype=torch.bfloat16)
    c = _garbage((pages, 64, 656), "cuda")
    d = c.clone()
    store_latent_fp8(c, slots, ckv, kpe)
    store_latent_fp8_ref(d, slots, ckv, kpe)
    assert torch.equal(c, d)
    e = torch.zeros(pages, 64, 576, device="cuda", dtype=torch.bfloat16)
    f = e.clone()
    store_latent_bf16(e, slots, ckv.float(), kpe.float())
    store_latent_bf16_ref(f, slots, ckv.float(), kpe.float())
    assert torch.equal(e, f)
