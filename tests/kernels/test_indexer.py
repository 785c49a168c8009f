"""Indexer quantisation, prefill/decode logits and top-k selection: Triton (interpreter on CPU) vs references."""
import pytest
import torch

from indexcache.kernels.indexer import (
    default_topk_fn,
    fused_params,
    hadamard_128,
    indexer_logits,
    indexer_logits_decode,
    indexer_topk_decode,
    indexer_prefill_candidates,
    choose_prefill_path,
    indexer_topk_prefill,
    indexer_topk_prefill_fused,
    indexer_topk_prefill_two_pass,
    plan_fused_chunks,
    plan_prefill_chunks,
    quantize_indexer_k,
    quantize_indexer_q,
    sample_columns,
)
from benchmarks.indexer_recall import fp8_recall, make_case
from indexcache.kernels.indexer.reference import (
    indexer_logits_decode_ref,
    indexer_logits_ref,
    prefill_candidates_ref,
    topk_recall,
    topk_rows_torch,
)
from indexcache.kernels.kv_store import new_indexer_cache, store_indexer_k
from indexcache.kernels.kv_store.reference import store_indexer_k_ref
from indexcache.kernels._dispatch import use_triton
from indexcache.kernels.indexer.ops import _scratch
from indexcache.kernels.topk.reference import topk_rows_reference
from tests.helpers import poisoned


def _inputs(t, s, h, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(t, h, 128, generator=g)
    wr = torch.randn(t, h, generator=g)
    k = torch.randn(s, 128, generator=g)
    q8, w = quantize_indexer_q(q.to(device), wr.to(device))
    k8, ks = quantize_indexer_k(k.to(device))
    return q8, w, k8, ks


def _ragged_windows(t, s, device, seed=0):
    """Three packed sequences with causal windows, one empty row, one row clipped past S."""
    g = torch.Generator().manual_seed(seed)
    lens = [s // 3, s // 3 + 5, s - 2 * (s // 3) - 5]
    rs, re = [], []
    starts = [0, lens[0], lens[0] + lens[1]]
    for i in range(t):
        j = i % 3
        pos = int(torch.randint(0, lens[j], (1,), generator=g))
        rs.append(starts[j])
        re.append(starts[j] + pos + 1)
    rs[1], re[1] = 7, 7  # empty window
    re[2] = s + 40  # clipped to S
    return torch.tensor(rs, dtype=torch.int32, device=device), torch.tensor(re, dtype=torch.int32, device=device)


def _assert_logits_close(out, ref):
    fin = torch.isfinite(ref)
    assert torch.equal(fin, torch.isfinite(out)), "-inf pattern differs"
    assert not torch.isnan(out).any()
    assert (out[~fin] == float("-inf")).all()
    scale = ref[fin].abs().max().clamp_min(1e-6)
    # interpreter: exact fp32 sums; Hopper fp8 MMA accumulates with ~13-bit intermediate precision
    tol = 1e-3 if out.is_cuda else 1e-4
    assert ((out[fin] - ref[fin]).abs().max() / scale) < tol


# ------------------------------------------------------------------------------------------------ quantisation
def test_hadamard_is_orthonormal_involution():
    x = torch.randn(5, 3, 128)
    y = hadamard_128(x)
    torch.testing.assert_close(hadamard_128(y), x, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1))
    with pytest.raises(ValueError, match="128"):
        hadamard_128(torch.randn(4, 64))


@pytest.mark.parametrize("hadamard", [False, True])
def test_quantize_q_k(hadamard):
    t, h = 9, 32
    q = torch.randn(t, h, 128) * torch.rand(t, h, 1) * 10
    q[0, 0] = 0.0  # all-zero vector: amax floor 1e-4 keeps the scale finite
    wr = torch.randn(t, h)
    q8, w = quantize_indexer_q(q, wr, hadamard=hadamard)
    assert q8.dtype == torch.float8_e4m3fn and w.dtype == torch.float32 and q8.shape == q.shape
    scale = w / (wr * 128**-0.5 * h**-0.5)
    log2 = torch.log2(scale)
    torch.testing.assert_close(log2, log2.round())  # power of two
    qq = hadamard_128(q) if hadamard else q
    deq = q8.float() * scale[..., None]
    assert (deq - qq).abs().max() <= (qq.abs().amax(-1, keepdim=True) * 2**-4 + 1e-6).max()
    assert (q8.float().abs().amax(-1) > 224).all() | (q[..., 0] == 0).any()  # scale rounds up, uses top binade
    k = torch.randn(37, 128, dtype=torch.float16)
    k8, ks = quantize_indexer_k(k, hadamard=hadamard)
    kk = hadamard_128(k.float()) if hadamard else k.float()
    assert ((k8.float() * ks[:, None] - kk).abs() <= kk.abs().amax(-1, keepdim=True) * 2**-4).all()
    with pytest.raises(ValueError, match="weights"):
        quantize_indexer_q(q, wr[:, :5])
    with pytest.raises(ValueError, match="128"):
        quantize_indexer_k(torch.randn(4, 64))


def _rows_to_quantise(lead, dtype, seed):
    """Random rows [*lead, 128] over a wide range of magnitudes, with the edge rows where present: all zeros
    (amax floor), tiny (e4m3 subnormals and underflow), huge (largest binades of the dtype), a power-of-two
    boundary (amax exactly 448 * 2^k) and signed zeros."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, 128, generator=g) * torch.exp2(torch.randint(-12, 12, (*lead, 1), generator=g).float())
    flat = x.view(-1, 128)
    big = 6e4 if dtype == torch.float16 else 1e37  # top binades, and a Hadamard of it stays finite
    edges = [torch.zeros(128), torch.randn(128, generator=g) * 3e-6, torch.randn(128, generator=g).sign() * big,
             torch.randn(128, generator=g).clamp(-1, 1) * 7.0, -torch.zeros(128)]
    edges[3][5] = 448.0 * 2**-6
    n = flat.shape[0]
    for i, e in enumerate(edges[:max(n - 1, 0)]):  # a single row stays random
        flat[1 + (i * 7) % (n - 1)] = e
    return x.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("lead", [(1,), (37,), (5, 3), (2, 7, 3), (0, 4)])
def test_quantize_rows_triton_bit_exact(dtype, lead):
    from indexcache.kernels.formats import quantize_rows
    from indexcache.kernels.indexer.triton import quantize_rows_triton

    x = _rows_to_quantise(lead, dtype, seed=len(lead) * 10 + lead[0])
    out = (poisoned((*lead, 128), torch.float8_e4m3fn, "cpu"), poisoned(lead, torch.float32, "cpu"))
    q8, s = quantize_rows_triton(x, out=out)
    q_ref, s_ref = quantize_rows(x)
    assert q8 is out[0] and s is out[1]
    assert torch.equal(q8.view(torch.uint8), q_ref.view(torch.uint8))
    assert torch.equal(s.view(torch.int32), s_ref.view(torch.int32))
    if x.numel() > 128:
        assert (q8.float().abs() == 448).any() and (q8.view(torch.uint8) == 0x80).any()  # top code, signed zero
    with pytest.raises(ValueError, match="out"):
        quantize_rows_triton(x, out=(out[0], torch.empty(lead + (1,))))


@pytest.mark.parametrize("h", [32, 20, 64])
def test_quantize_indexer_q_k_match_reference_bit_exact(h):
    hadamard = False  # with a rotation the reference runs (ops.quantize_indexer_q says why)
    from indexcache.kernels.indexer.reference import quantize_indexer_k_ref, quantize_indexer_q_ref

    t = 11
    q = _rows_to_quantise((t, h), torch.float32, seed=h)
    g = torch.Generator().manual_seed(h + 1)
    wr = torch.randn(h, t, generator=g).T  # not contiguous
    assert use_triton(q)  # the CPU run goes through the interpreted kernel
    q8, w = quantize_indexer_q(q, wr, hadamard=hadamard)
    q8_ref, w_ref = quantize_indexer_q_ref(q, wr, hadamard=hadamard)
    assert torch.equal(q8.view(torch.uint8), q8_ref.view(torch.uint8))
    assert w.dtype == torch.float32 and torch.equal(w.view(torch.int32), w_ref.view(torch.int32))
    k = _rows_to_quantise((3 * h + 1,), torch.float16, seed=h + 2)
    k8, ks = quantize_indexer_k(k, hadamard=hadamard)
    k8_ref, ks_ref = quantize_indexer_k_ref(k, hadamard=hadamard)
    assert torch.equal(k8.view(torch.uint8), k8_ref.view(torch.uint8)) and torch.equal(ks, ks_ref)


@pytest.mark.gpu
def test_gpu_quantize_indexer_q_bf16_bit_exact():
    from indexcache.kernels.formats import quantize_rows
    from indexcache.kernels.indexer.reference import quantize_indexer_q_ref
    from indexcache.kernels.indexer.triton import quantize_rows_triton

    t, h = 4099, 32
    mag = torch.exp2(torch.randint(-12, 12, (t, h, 1), device="cuda").float())
    q = (torch.randn(t, h, 128, device="cuda") * mag).bfloat16()
    q[3, 4] = 0
    q[5, 6] = 3e38
    w = torch.randn(t, h, device="cuda", dtype=torch.bfloat16)
    q8, wf = quantize_indexer_q(q, w)
    q8_ref, wf_ref = quantize_indexer_q_ref(q, w)
    _assert_same_bits(q8.view(torch.uint8), q8_ref.view(torch.uint8), "q_fp8", q)
    _assert_same_bits(wf.view(torch.int32), wf_ref.view(torch.int32), "w_folded", w)
    out = (poisoned((t, h, 128), torch.float8_e4m3fn, "cuda"), poisoned((t, h), torch.float32, "cuda"))
    q8, s = quantize_rows_triton(q, out=out)
    q_ref, s_ref = quantize_rows(q)
    _assert_same_bits(q8.view(torch.uint8), q_ref.view(torch.uint8), "quantize_rows q", q)
    _assert_same_bits(s.view(torch.int32), s_ref.view(torch.int32), "quantize_rows scale", q)


def _assert_same_bits(got, ref, what, src):
    """Bit equality, and where it fails a message with the count and the first few differing entries (the GPU
    run is the only place this can fail, so the message must say enough to fix it)."""
    bad = (got != ref).nonzero()
    if len(bad):
        idx = [tuple(int(v) for v in b) for b in bad[:4]]
        rows = [tuple(i[:2]) for i in idx]
        raise AssertionError(f"{what}: {len(bad)} of {got.numel()} differ; first at {idx}: got {[int(got[i]) for i in idx]}"
                             f" ref {[int(ref[i]) for i in idx]}; source row amax "
                             f"{[float(src[r].float().abs().max()) for r in rows]}")


# ------------------------------------------------------------------------------------------------ prefill logits
@pytest.mark.parametrize("h,t,s", [(32, 13, 203), (64, 7, 150), (20, 5, 97)])
def test_indexer_logits_matches_reference(h, t, s, device):
    q8, w, k8, ks = _inputs(t, s, h, device, seed=h)
    rs, re = _ragged_windows(t, s, device, seed=h)
    out = poisoned((t, s), torch.float32, device)
    res = indexer_logits(q8, w, k8, ks, rs, re, out=out)
    assert res.data_ptr() == out.data_ptr()
    _assert_logits_close(out, indexer_logits_ref(q8, w, k8, ks, rs, re))


def test_indexer_logits_full_windows_and_empty(device):
    t, s, h = 6, 130, 32
    q8, w, k8, ks = _inputs(t, s, h, device, seed=3)
    rs = torch.zeros(t, dtype=torch.int32, device=device)
    re = torch.full((t,), s, dtype=torch.int32, device=device)
    _assert_logits_close(indexer_logits(q8, w, k8, ks, rs, re), indexer_logits_ref(q8, w, k8, ks, rs, re))
    out = indexer_logits(q8, w, k8, ks, rs, rs)  # every window empty: all -inf, nothing computed
    assert (out == float("-inf")).all()


def test_indexer_logits_bad_inputs():
    q8, w, k8, ks = _inputs(4, 10, 32, "cpu")
    rs = torch.zeros(4, dtype=torch.int32)
    with pytest.raises(ValueError, match="q_fp8"):
        indexer_logits(q8.float(), w, k8, ks, rs, rs)
    with pytest.raises(ValueError, match="w must be"):
        indexer_logits(q8, w[:, :3], k8, ks, rs, rs)
    with pytest.raises(ValueError, match="k_scale"):
        indexer_logits(q8, w, k8, ks[:5], rs, rs)
    with pytest.raises(ValueError, match="row_end"):
        indexer_logits(q8, w, k8, ks, rs, rs[:2])
    with pytest.raises(ValueError, match="out"):
        indexer_logits(q8, w, k8, ks, rs, rs, out=torch.empty(4, 11))


# ------------------------------------------------------------------------------------------------ selection
def _check_topk(idx, logits, rs, re, topk):
    """Same index sets as torch.topk on the reference logits, up to ties (then the selected scores agree)."""
    ref = topk_rows_torch(logits, topk, row_start=rs, row_end=re)
    assert idx.dtype == torch.int32 and idx.shape == ref.shape
    for r in range(idx.shape[0]):
        a = idx[r][idx[r] >= 0]
        b = ref[r][ref[r] >= 0]
        assert len(a) == len(b) == max(0, min(topk, int(re[r].clamp(max=logits.shape[1])) - int(rs[r])))
        assert len(set(a.tolist())) == len(a)
        assert ((a >= rs[r]) & (a < re[r])).all()
        if set(a.tolist()) != set(b.tolist()):
            torch.testing.assert_close(logits[r, a.long()].sort().values, logits[r, b.long()].sort().values)
        assert (idx[r][len(a):] == -1).all()


def test_topk_prefill_chunked_equals_unchunked(device):
    t, s, h, topk = 23, 157, 32, 40
    q8, w, k8, ks = _inputs(t, s, h, device, seed=5)
    rs, re = _ragged_windows(t, s, device, seed=5)
    whole = indexer_topk_prefill(q8, w, k8, ks, rs, re, topk, topk_fn=topk_rows_torch)
    tiny = 3 * (s * 4 + 24 * topk)  # logits and selection of 3 rows per chunk (the logits under 3/4 of it)
    assert len(plan_prefill_chunks(rs, re, topk, tiny)) >= 8
    chunked = indexer_topk_prefill(q8, w, k8, ks, rs, re, topk, workspace_bytes=tiny, topk_fn=topk_rows_torch)
    logits = indexer_logits_ref(q8, w, k8, ks, rs, re)
    _check_topk(whole, logits, rs, re.clamp(max=s), topk)
    _check_topk(chunked, logits, rs, re.clamp(max=s), topk)
    assert topk_recall(chunked, whole) == 1.0
    # rows sorted by sequence: later chunks start at a column offset c0 > 0 (indices shifted back)
    order = torch.argsort(rs.cpu() * 1000 + re.cpu()).to(device)
    rs2, re2 = rs[order], re[order]
    assert any(c0 > 0 for _, _, c0, _ in plan_prefill_chunks(rs2, re2, topk, tiny))
    chunked2 = indexer_topk_prefill(q8, w, k8, ks, rs2, re2, topk, workspace_bytes=tiny, topk_fn=topk_rows_torch)
    _check_topk(chunked2, indexer_logits_ref(q8, w, k8, ks, rs2, re2), rs2, re2.clamp(max=s), topk)


def test_default_topk_fn():
    fn = default_topk_fn()
    try:
        from indexcache.kernels.topk import topk_rows
    except ImportError:
        assert fn is topk_rows_torch
    else:
        assert fn is topk_rows


def test_topk_prefill_short_rows(device):
    t, s, h, topk = 9, 75, 64, 64  # causal rows shorter than topk get -1 padding
    q8, w, k8, ks = _inputs(t, s, h, device, seed=6)
    re = torch.arange(s - t + 1, s + 1, dtype=torch.int32, device=device) - 40
    rs = torch.zeros(t, dtype=torch.int32, device=device)
    idx = indexer_topk_prefill(q8, w, k8, ks, rs, re, topk, workspace_bytes=4 * 24 * topk * 2,
                               topk_fn=topk_rows_torch)
    _check_topk(idx, indexer_logits_ref(q8, w, k8, ks, rs, re), rs, re, topk)
    assert (idx == -1).any()


def test_plan_prefill_chunks_respects_workspace():
    t, s = 1000, 5000
    re = torch.arange(s - t + 1, s + 1, dtype=torch.int32)
    rs = torch.zeros(t, dtype=torch.int32)
    ws = 1 << 20
    # topk 64: the logits' 3/4 cap binds; topk 2048: the joint budget binds (a large selection)
    for topk, binds in ((64, "logits"), (2048, "joint")):
        chunks = plan_prefill_chunks(rs, re, topk, ws)
        assert chunks[0][0] == 0 and chunks[-1][1] == t
        for (r0, r1, c0, c1), nxt in zip(chunks, chunks[1:] + [None]):
            n = r1 - r0
            assert n * ((c1 - c0) * 4 + 24 * topk) <= ws and n * (c1 - c0) * 4 <= ws * 3 // 4
            assert c0 == 0 and c1 == int(re[r1 - 1])
            if nxt is not None:  # as many rows as fit: one more breaks the binding limit
                assert nxt[0] == r1
                span = int(re[r1])
                if binds == "logits":
                    assert (n + 1) * span * 4 > ws * 3 // 4
                else:
                    assert (n + 1) * (span * 4 + 24 * topk) > ws
    with pytest.raises(ValueError, match="workspace_bytes"):
        plan_prefill_chunks(rs, re, 64, 100)


def test_plan_prefill_chunks_fills_whole_waves():
    """With ``wave_rows``, each chunk that has room for more than a wave takes a multiple of it (the largest that
    fits), so only a segment's last chunk leaves a wave part-empty; the workspace is still respected; rows of
    ragged packed windows are all covered once."""
    t, s, ws, topk = 3000, 9000, 1 << 20, 64
    re = torch.arange(s - t + 1, s + 1, dtype=torch.int32)
    rs = (torch.arange(t, dtype=torch.int32) * 13) % 500
    plain = plan_prefill_chunks(rs, re, topk, ws)
    for wave in (7, 40, 1000):
        chunks = plan_prefill_chunks(rs, re, topk, ws, wave_rows=wave)
        assert [c[0] for c in chunks[1:]] == [c[1] for c in chunks[:-1]] and chunks[0][0] == 0 and chunks[-1][1] == t
        for r0, r1, c0, c1 in chunks:
            n = r1 - r0
            assert n * ((c1 - c0) * 4 + 24 * topk) <= ws and n * (c1 - c0) * 4 <= ws * 3 // 4
            assert c0 == int(rs[r0:r1].min()) and c1 == int(re[r0:r1].max())
            r0_, r1_, _, _ = plan_prefill_chunks(rs[r0:], re[r0:], topk, ws)[0]  # the rows that fit from r0
            if r1 < t and r1_ - r0_ > wave:
                assert n % wave == 0 and n > r1_ - r0_ - wave, (wave, r0, n)
            else:
                assert n == r1_ - r0_, (wave, r0, n)
        if wave < plain[0][1]:
            assert len(chunks) >= len(plain)
    assert plan_prefill_chunks(rs, re, topk, ws, wave_rows=1) == plain
    for bad in (0, -3, 2.0, True):
        with pytest.raises(ValueError, match="wave_rows"):
            plan_prefill_chunks(rs, re, topk, ws, wave_rows=bad)
    q8, w, k8, ks = _inputs(8, 50, 4, "cpu", seed=1)
    with pytest.raises(ValueError, match="wave_rows"):
        indexer_topk_prefill_two_pass(q8, w, k8, ks, torch.zeros(8, dtype=torch.int32),
                                      torch.full((8,), 50, dtype=torch.int32), 4, wave_rows=0)


def test_topk_rows_torch_padding():
    logits = torch.randn(3, 10)
    idx = topk_rows_torch(logits, 12, row_start=torch.tensor([0, 2, 5]), row_end=torch.tensor([10, 4, 5]))
    assert idx.shape == (3, 12)
    assert sorted(idx[0, :10].tolist()) == list(range(10)) and (idx[0, 10:] == -1).all()
    assert sorted(idx[1, :2].tolist()) == [2, 3] and (idx[1, 2:] == -1).all()
    assert (idx[2] == -1).all()


# ------------------------------------------------------------------------------------------------ decode
def _paged_case(b, h, ctx, max_pages, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    num_pages = b * max_pages + 3
    cache = new_indexer_cache(num_pages, device)
    cache.copy_(torch.randint(0, 255, cache.shape, generator=g, dtype=torch.uint8).to(device))
    cache.view(torch.float32)[:, 2048:] = 1e30  # garbage scales where nothing was stored
    perm = torch.randperm(num_pages, generator=g)[: b * max_pages].view(b, max_pages).to(torch.int32)
    block_table = perm.to(device)
    for i in range(b):
        pos = torch.arange(ctx[i])
        slots = perm[i, pos // 64].long() * 64 + pos % 64
        store_indexer_k_ref(cache, slots.to(device), torch.randn(ctx[i], 128, generator=g).to(device))
    q = torch.randn(b, h, 128, generator=g).to(device)
    q8, w = quantize_indexer_q(q, torch.randn(b, h, generator=g).to(device))
    return q8, w, cache, block_table, torch.tensor(ctx, dtype=torch.int32, device=device)


@pytest.mark.parametrize("h", [32, 64])
def test_decode_logits_matches_reference(h, device):
    ctx = [1, 130, 64, 0, 200]
    max_len = 203
    q8, w, cache, bt, cl = _paged_case(len(ctx), h, ctx, 4, device, seed=h)
    out = poisoned((len(ctx), max_len), torch.float32, device)
    indexer_logits_decode(q8, w, cache, bt, cl, max_len, out=out)
    _assert_logits_close(out, indexer_logits_decode_ref(q8, w, cache, bt, cl, max_len))


def test_decode_topk(device):
    ctx = [70, 3, 190]
    q8, w, cache, bt, cl = _paged_case(3, 32, ctx, 3, device, seed=9)
    idx = indexer_topk_decode(q8, w, cache, bt, cl, 190, 16, topk_fn=topk_rows_torch)
    logits = indexer_logits_decode_ref(q8, w, cache, bt, cl, 190)
    _check_topk(idx, logits, torch.zeros(3, dtype=torch.int32, device=device), cl, 16)
    assert (idx[1, 3:] == -1).all()


def test_decode_bad_inputs():
    q8, w, cache, bt, cl = _paged_case(2, 32, [5, 6], 1, "cpu")
    with pytest.raises(ValueError, match="max_len"):
        indexer_logits_decode(q8, w, cache, bt, cl, 65)
    with pytest.raises(ValueError, match="kv_cache"):
        indexer_logits_decode(q8, w, cache[:, :8000].contiguous(), bt, cl, 10)
    with pytest.raises(ValueError, match="block_table"):
        indexer_logits_decode(q8, w, cache, bt.long(), cl, 10)
    with pytest.raises(ValueError, match="context_lens"):
        indexer_logits_decode(q8, w, cache, bt, cl[:1], 10)


def test_store_then_decode_with_triton_store(device):
    """Keys written by store_indexer_k (Triton path) are read back by the decode kernel."""
    b, h, ctx = 2, 32, [100, 37]
    q8, w, cache, bt, cl = _paged_case(b, h, [0, 0], 2, device, seed=11)
    g = torch.Generator().manual_seed(12)
    for i in range(b):
        pos = torch.arange(ctx[i])
        slots = (bt[i].cpu()[pos // 64].long() * 64 + pos % 64).to(device)
        store_indexer_k(cache, slots, torch.randn(ctx[i], 128, generator=g).to(device))
    cl = torch.tensor(ctx, dtype=torch.int32, device=device)
    out = indexer_logits_decode(q8, w, cache, bt, cl, 128)
    _assert_logits_close(out, indexer_logits_decode_ref(q8, w, cache, bt, cl, 128))


# ------------------------------------------------------------------------------------------------ recall
@pytest.mark.parametrize("kind,hadamard,floor", [
    ("random", False, 0.93), ("random", True, 0.93),
    ("structured", False, 0.97), ("structured", True, 0.97),
    ("outlier", False, 0.93), ("outlier", True, 0.97),
])
def test_fp8_topk_recall(kind, hadamard, floor):
    case = make_case(kind, 48, 4096, 32, seed=2)
    rec = fp8_recall(*case, 512, hadamard=hadamard, logits_fn=indexer_logits_ref)
    print(f"recall {kind} hadamard={hadamard}: {rec:.4f}")
    assert rec >= floor


def test_fp8_recall_with_kernel_logits(device):
    case = make_case("structured", 6, 300, 32, seed=4, device=device)
    rec_kernel = fp8_recall(*case, 64, logits_fn=indexer_logits)
    rec_ref = fp8_recall(*case, 64, logits_fn=indexer_logits_ref)
    assert abs(rec_kernel - rec_ref) < 1e-6 and rec_kernel > 0.9


# ------------------------------------------------------------------------------------------------ GPU (real sizes)
@pytest.mark.gpu
@pytest.mark.parametrize("h", [32, 64])
def test_gpu_prefill_logits_real_size(h):
    t, s = 1024, 8192 + 37
    q = torch.randn(t, h, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(s, 128, device="cuda", dtype=torch.bfloat16)
    q8, w = quantize_indexer_q(q, torch.randn(t, h, device="cuda", dtype=torch.bfloat16), hadamard=True)
    k8, ks = quantize_indexer_k(k, hadamard=True)
    re = torch.arange(s - t + 1, s + 1, dtype=torch.int32, device="cuda")
    rs = (torch.arange(t, device="cuda", dtype=torch.int32) * 3) % 500
    out = poisoned((t, s), torch.float32, "cuda")
    indexer_logits(q8, w, k8, ks, rs, re, out=out)
    ref = indexer_logits_ref(q8, w, k8, ks, rs, re)
    fin = torch.isfinite(ref)
    assert torch.equal(fin, torch.isfinite(out))
    err = (out[fin] - ref[fin]).norm() / ref[fin].norm()
    assert err < 1e-3, err


@pytest.mark.gpu
def test_gpu_decode_and_topk_real_size():
    ctx = [65536, 1000, 4097, 300]
    q8, w, cache, bt, cl = _paged_case(4, 64, ctx, 1024, "cuda", seed=1)
    out = indexer_logits_decode(q8, w, cache, bt, cl, 65536)
    ref = indexer_logits_decode_ref(q8, w, cache, bt, cl, 65536)
    fin = torch.isfinite(ref)
    assert torch.equal(fin, torch.isfinite(out))
    assert (out[fin] - ref[fin]).norm() / ref[fin].norm() < 1e-3
    idx = indexer_topk_decode(q8, w, cache, bt, cl, 65536, 2048)
    ref_idx = topk_rows_torch(ref, 2048, row_end=cl)
    assert topk_recall(idx, ref_idx) > 0.99


@pytest.mark.gpu
def test_gpu_topk_prefill_chunked():
    t, s, h, topk = 2048, 6000, 64, 2048
    q8, w, k8, ks = _inputs(t, s, h, "cuda", seed=7)
    re = torch.arange(s - t + 1, s + 1, dtype=torch.int32, device="cuda")
    rs = torch.zeros(t, dtype=torch.int32, device="cuda")
    a = indexer_topk_prefill(q8, w, k8, ks, rs, re, topk, workspace_bytes=8 << 20)
    b = indexer_topk_prefill(q8, w, k8, ks, rs, re, topk, topk_fn=topk_rows_torch)
    assert topk_recall(a, b) > 0.999


# ------------------------------------------------------------------------------------------------ fused prefill top-k
def _exact_sets(idx, logits, rs, re, topk):
    """Index sets equal those of the exact selection (lower column wins ties) on the same logits."""
    ref = topk_rows_reference(logits, topk, row_start=rs, row_end=re)
    assert idx.dtype == torch.int32 and idx.shape == ref.shape
    for r in range(idx.shape[0]):
        a = idx[r][idx[r] >= 0]
        assert (idx[r][len(a):] == -1).all(), "-1 only as trailing padding"
    assert torch.equal(idx.sort(1).values.cpu(), ref.sort(1).values.cpu())


@pytest.mark.parametrize("h", [32, 20])
def test_prefill_candidates_match_reference(h, device):
    t, s, cap = 12, 203, 24
    q8, w, k8, ks = _inputs(t, s, h, device, seed=21)
    rs, re = _ragged_windows(t, s, device, seed=21)
    rs[0], re[0] = 0, s
    logits = indexer_logits(q8, w, k8, ks, rs, re)  # the same tile code: scores bit-identical to the kernel's
    fin = torch.where(torch.isfinite(logits), logits, float("nan"))
    thr = fin.nanquantile(0.5, dim=1).nan_to_num(0.0)  # half of each window: long rows overflow cap
    thr[0] = float("-inf")                            # every valid score (overflows)
    thr[3] = float("inf")                             # nothing
    thr[4] = logits[4, int(re[4]) - 1]                # a score of the row itself (>= keeps it)
    out = (poisoned((t, cap), torch.float32, device), poisoned((t, cap), torch.int32, device),
           poisoned((t, 2), torch.int32, device))
    vals, cols, counts = indexer_prefill_candidates(q8, w, k8, ks, rs, re, thr, cap, out=out)
    assert vals.data_ptr() == out[0].data_ptr()
    rv, rc, rn = prefill_candidates_ref(logits, thr, cap)
    assert torch.equal(counts.cpu(), rn.cpu())
    assert (counts[:, 0] > cap).any() and (counts[:, 0] < cap).any() and counts[3, 0] == 0
    kept = counts[:, 0].clamp(max=cap)
    for r in range(t):
        n = int(kept[r])
        assert bool(torch.isnan(vals[r, n:]).all()) and bool((cols[r, n:] == -7777).all())  # never written
        c, order = cols[r, :n].long().sort()  # the kernel's lists are in no particular order: compare as sets
        assert c.unique().numel() == n and bool(((c >= rs[r]) & (c < re[r])).all())
        assert bool((logits[r, c] >= thr[r]).all())
        assert torch.equal(vals[r, :n][order], logits[r, c])  # each candidate with its own score
        if int(counts[r, 0]) <= cap:  # overflowing rows keep some cap of their candidates
            assert torch.equal(c.cpu(), rc[r, :n].long().cpu())
            assert torch.equal(vals[r, :n][order].cpu(), rv[r, :n].cpu())
    with pytest.raises(ValueError, match="thr"):
        indexer_prefill_candidates(q8, w, k8, ks, rs, re, thr.double(), cap)


def _fused(q8, w, k8, ks, rs, re, topk, **kw):
    stats = {}
    out = poisoned((q8.shape[0], topk), torch.int32, q8.device)
    idx = indexer_topk_prefill_fused(q8, w, k8, ks, rs, re, topk, topk_fn=topk_rows_reference, out=out,
                                     stats=stats, **kw)
    assert idx.data_ptr() == out.data_ptr()
    return idx, stats


@pytest.mark.parametrize("cap", [None, 4096])
def test_fused_topk_prefill_matches_reference(cap, device):
    """Ragged windows (an empty one, one clipped past S, many shorter than topk), S not a multiple of the tile,
    the smallest workspace: one row per selection sub-chunk, sample sub-chunks whose windows start past 0, and
    (cap 4096, no row needs a sample) several candidate chunks. Sets equal the exact selection."""
    t, s, h, topk = 12, 421, 32, 24
    q8, w, k8, ks = _inputs(t, s, h, device, seed=22)
    rs, re = _ragged_windows(t, s, device, seed=22)
    rs[0], re[0] = 0, s
    rs[4], re[4] = 40, s - 3
    order = torch.argsort(rs.cpu() * 1000 + re.cpu()).to(device)
    rs, re = rs[order], re[order]
    p, r, cap = fused_params(topk, 4, cap)
    ws = 4 * max(_scratch(topk, cap), _scratch(r, s) + 16 + 4 * s)
    idx, st = _fused(q8, w, k8, ks, rs, re, topk, sample_stride=4, cap=cap, workspace_bytes=ws)
    assert st["fallback_rows"] == 0 and st["cap"] == cap
    if cap < s:
        assert int(((re.clamp(max=s) - rs) > cap).sum()) >= 2 and st["sample_chunks"] >= 2  # rows used the sample
    else:
        assert st["chunks"] >= 3
    logits = indexer_logits(q8, w, k8, ks, rs, re)
    _exact_sets(idx, logits, rs, re.clamp(max=s), topk)
    _check_topk(idx, indexer_logits_ref(q8, w, k8, ks, rs, re), rs, re.clamp(max=s), topk)


@pytest.mark.parametrize("cap,fallback", [(None, True), (512, False)])
def test_fused_topk_prefill_heavy_ties(cap, fallback, device):
    """Hundreds of equal scores at the threshold: with the default capacity they overflow the candidate list
    and the rows are redone by the two-pass path; with room for them the candidate select breaks the ties by
    the lower column. Either way the sets are the exact ones."""
    t, s, h, topk = 6, 400, 32, 24
    q8, w, k8, ks = _inputs(t, s, h, device, seed=23)
    k8[50:380] = k8[7]          # 330 identical keys (one score, repeated) among random ones
    ks[50:380] = ks[7]
    w = w.abs()                 # non-negative scores: the repeated key ranks in the upper part of every row
    rs = torch.zeros(t, dtype=torch.int32, device=device)
    re = torch.tensor([400, 399, 390, 385, 300, 250], dtype=torch.int32, device=device)
    idx, st = _fused(q8, w, k8, ks, rs, re, topk, sample_stride=4, cap=cap)
    logits = indexer_logits(q8, w, k8, ks, rs, re)
    thr_rank = torch.sort(logits, 1, descending=True).values[:, topk - 1]
    assert ((logits == thr_rank[:, None]).sum(1) > 100).any()  # the k-th score is tied hundreds of times
    assert (st["fallback_rows"] > 0) == fallback
    _exact_sets(idx, logits, rs, re, topk)


def test_fused_topk_prefill_sample_misses(device):
    """Adversarial scores: the sampled columns hold the row maxima, so the threshold leaves fewer than topk
    candidates; those rows take the fallback and stay exact."""
    t, s, h, topk = 5, 700, 32, 64
    q8, w, k8, ks = _inputs(t, s, h, device, seed=24)
    w = w.abs()
    p, r, cap = fused_params(topk, 4)
    assert r < topk and s > cap
    ks = ks.clone()
    ks[sample_columns(s, p, device)] *= 64.0
    rs = torch.zeros(t, dtype=torch.int32, device=device)
    re = torch.tensor([700, 690, 650, 600, 300], dtype=torch.int32, device=device)
    idx, st = _fused(q8, w, k8, ks, rs, re, topk, sample_stride=4)
    assert st["fallback_rows"] == 4  # the short row (300 <= cap) takes every score and needs no sample
    _exact_sets(idx, indexer_logits(q8, w, k8, ks, rs, re), rs, re, topk)


def test_choose_prefill_path_and_dispatch(monkeypatch, device):
    """The rule is a step in the context length, per head group; indexer_topk_prefill runs the chosen path
    (with Triton) and both paths give the exact sets."""
    from indexcache.kernels.indexer import ops

    for h, limit in ((32, ops.FUSED_MIN_CONTEXT_UP_TO_32_HEADS), (20, ops.FUSED_MIN_CONTEXT_UP_TO_32_HEADS),
                     (64, ops.FUSED_MIN_CONTEXT_OVER_32_HEADS)):
        assert choose_prefill_path(limit - 1, h) == "two_pass" and choose_prefill_path(limit, h) == "fused"
    t, s, h, topk = 6, 300, 32, 16
    q8, w, k8, ks = _inputs(t, s, h, device, seed=25)
    rs, re = _ragged_windows(t, s, device, seed=25)
    logits = indexer_logits_ref(q8, w, k8, ks, rs, re)
    calls = []
    for name in ("indexer_topk_prefill_fused", "indexer_topk_prefill_two_pass"):
        impl = getattr(ops, name)
        monkeypatch.setattr(ops, name, lambda *a, _impl=impl, _n=name, **kw: calls.append(_n) or _impl(*a, **kw))
    for limit, want in ((s + 1, "indexer_topk_prefill_two_pass"), (s, "indexer_topk_prefill_fused")):
        monkeypatch.setattr(ops, "FUSED_MIN_CONTEXT_UP_TO_32_HEADS", limit)
        calls.clear()
        idx = indexer_topk_prefill(q8, w, k8, ks, rs, re, topk, topk_fn=topk_rows_reference)
        assert calls[0] == (want if use_triton(q8) else "indexer_topk_prefill_two_pass")
        _check_topk(idx, logits, rs, re.clamp(max=s), topk)


def test_plan_fused_chunks_and_small_workspace():
    t, s = 500, 3000
    re = torch.arange(s - t + 1, s + 1, dtype=torch.int32)
    rs = (torch.arange(t, dtype=torch.int32) * 5) % 700
    ws, row_bytes = 1 << 20, 3000
    chunks = plan_fused_chunks(rs, re, row_bytes, ws)
    assert chunks[0][0] == 0 and chunks[-1][1] == t and len(chunks) > 1
    for (r0, r1, c0, c1), nxt in zip(chunks, chunks[1:] + [None]):
        assert (r1 - r0) * ((c1 - c0) * 4 + row_bytes) <= ws
        assert c0 == int(rs[r0:r1].min()) and c1 == int(re[r0:r1].max())
        assert nxt is None or nxt[0] == r1
    with pytest.raises(ValueError, match="workspace_bytes"):
        plan_fused_chunks(rs, re, row_bytes, 1000)
    if use_triton(re):
        q8, w, k8, ks = _inputs(4, 10, 32, "cpu")
        with pytest.raises(ValueError, match="workspace_bytes"):
            indexer_topk_prefill_fused(q8, w, k8, ks, rs[:4], re[:4].clamp(max=10), 8, workspace_bytes=1000)


@pytest.mark.gpu
@pytest.mark.parametrize("h", [32, 64])
def test_gpu_fused_topk_prefill_equals_two_pass(h):
    t, s, topk = 3000, 9000, 2048
    q8, w, k8, ks = _inputs(t, s, h, "cuda", seed=h)
    re = torch.arange(s - t + 1, s + 1, dtype=torch.int32, device="cuda")
    rs = (torch.arange(t, device="cuda", dtype=torch.int32) * 7) % 900
    st = {}
    a = indexer_topk_prefill_fused(q8, w, k8, ks, rs, re, topk, stats=st)
    # the fused path scores with the Triton tile code (its candidates kernel); on Hopper two-pass defaults to Gluon
    b = indexer_topk_prefill_two_pass(q8, w, k8, ks, rs, re, topk, logits_kernel="triton")
    assert torch.equal(a.sort(1).values, b.sort(1).values), st
