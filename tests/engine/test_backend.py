"""TritonBackend (the kernels, in Triton's interpreter on CPU) against TorchBackend inside the engine, on a model
with the kernels' shapes (512+64 latent, 128-dim indexer keys). Prompts are shorter than top-k, so FP8 indexer
scores cannot change the selection and the two backends must give the same logits. ``topk_rows`` runs as its
PyTorch reference here (its interpreter run takes tens of seconds; tests/kernels/ compare the two); the decode
top-k (``topk_rows_decode``, a fraction of a second) runs as the kernel."""
import pytest
import torch

from indexcache.checkpoint import build_empty
from indexcache.engine import attention_backend, engine as engine_module
from indexcache.engine import EngineConfig
from indexcache.engine.attention_backend import (CacheFormats, TorchBackend, TritonBackend, decode_topk_bytes,
                                                 decode_topk_rows)
from indexcache.kernels.indexer import topk_rows_torch
from indexcache.kernels.topk import DecodeTopkWorkspace, topk_rows_decode, topk_rows_reference
from indexcache.kernels._dispatch import interpreting
from indexcache.presets import preset_config

from .helpers import greedy, make_engine, run

pytestmark = pytest.mark.skipif(not interpreting(), reason="needs TRITON_INTERPRET=1 (tests/conftest.py sets it)")


@pytest.fixture(scope="module")
def model():
    cfg = preset_config("tiny").replace(num_layers=2, kv_lora_rank=512, qk_rope_head_dim=64, index_head_dim=128,
                                        index_topk=64, num_heads=2, index_n_heads=2).with_pattern("FS")
    return build_empty(cfg, "cpu", torch.float32).init_random(11).eval()


@pytest.mark.parametrize("latent,dequant_reads", [("fp32", None), ("fp8", 4), ("fp8", 8), ("fp8", 10**9)])
def test_triton_backend_equals_torch_backend(model, latent, dequant_reads, monkeypatch):
    """FP8 latent: the two prompts prefill in one forward; the top-k reads each context row 11 times (the
    11-token prompt) and 4 times (the 4-token one). Threshold 4: both attend over a dequantised copy of their
    context; 8: the first over the copy, the second straight from the FP8 rows (rows split in one layer);
    out of reach: both from the FP8 rows."""
    prompts = [torch.randint(0, 512, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (11, 4)]
    if dequant_reads is not None:
        monkeypatch.setattr(attention_backend, "FP8_PREFILL_DEQUANT_MIN_READS", dequant_reads)
    copies = []
    real_dequant = attention_backend.dequant_latent_rows
    monkeypatch.setattr(attention_backend, "dequant_latent_rows",
                        lambda *a: copies.append(a[1].numel()) or real_dequant(*a))
    ref_eng = make_engine(model, kv_cache_dtype=latent, max_model_len=128, max_num_seqs=2, page_size=64)
    assert type(ref_eng.backend) is TorchBackend and ref_eng.kv.indexer_format == "exact"
    toks_ref, logits_ref = run(ref_eng, prompts, greedy(2))

    monkeypatch.setattr(engine_module, "resolve_formats", lambda *a: CacheFormats(latent, "fp8"))
    monkeypatch.setattr(engine_module, "make_backend", TritonBackend)
    monkeypatch.setattr(attention_backend, "topk_rows", topk_rows_torch)
    eng = make_engine(model, kv_cache_dtype=latent, max_model_len=128, max_num_seqs=2, page_size=64)
    assert type(eng.backend) is TritonBackend and eng.backend.fp8_index and eng.backend.latent_kernels
    assert eng.kv.index[1] is None and eng.kv.index[0].dtype == torch.uint8  # FP8 keys, F layers only
    toks, logits = run(eng, prompts, greedy(2))
    assert toks == toks_ref
    # one copy per layer (2) of the chosen prompts' context rows in the one prefill forward, none in decode
    assert copies == {None: [], 4: [15, 15], 8: [11, 11], 10**9: []}[dequant_reads]
    # FP8 latent: the interpreter rounds some e4m3 values of the store kernel one step off the reference quantiser
    tol = 3e-3 if latent == "fp8" else 1e-4
    for a, b in zip(logits, logits_ref):
        torch.testing.assert_close(a, b, atol=tol, rtol=1e-4)


def test_decode_topk_workspace_rows():
    """Rows of the decode top-k workspace: FP8 indexer only, at most decode_topk_max_rows and max_num_seqs, and
    within workspace_bytes."""
    cfg = EngineConfig(max_model_len=4096, max_num_seqs=16)
    per_row = DecodeTopkWorkspace.bytes_per_row(4096)
    assert per_row == 16 * 4096 + (256 + 4 * 4096) * 4 + 96    # lists, hist1 | hist2 replicas, counters and state
    assert decode_topk_rows(cfg, "fp8") == 16
    assert decode_topk_rows(cfg, "exact") == 0 and decode_topk_bytes(cfg, "exact") == 0
    assert decode_topk_rows(EngineConfig(max_model_len=4096, max_num_seqs=256), "fp8") == 16   # the default cap
    assert decode_topk_rows(EngineConfig(max_model_len=4096, decode_topk_max_rows=4), "fp8") == 4
    assert decode_topk_rows(EngineConfig(max_model_len=4096, decode_topk_max_rows=0), "fp8") == 0
    big = EngineConfig(max_model_len=1_000_000, max_num_seqs=64, workspace_bytes=100 << 20)   # ~16 MB a row
    n = big.max_blocks_per_seq * big.page_size
    assert decode_topk_rows(big, "fp8") == (100 << 20) // DecodeTopkWorkspace.bytes_per_row(n) == 6
    assert decode_topk_bytes(big, "fp8") == 6 * DecodeTopkWorkspace.bytes_per_row(n)
    with pytest.raises(ValueError, match="decode_topk_max_rows must be an integer >= 0, got -1"):
        EngineConfig(decode_topk_max_rows=-1)


def test_decode_topk_in_the_engine(model, monkeypatch):
    """Decode batches of up to decode_topk_max_rows sequences select with topk_rows_decode (the kernel, in the
    interpreter) on views of the backend's one workspace, larger ones with topk_rows; every decode selection is
    the exact one, and tokens and logits equal an engine that never uses it. Contexts longer than top-k (64)."""
    monkeypatch.setattr(engine_module, "resolve_formats", lambda *a: CacheFormats("fp32", "fp8"))
    monkeypatch.setattr(engine_module, "make_backend", TritonBackend)
    calls = []

    def decode_spy(logits, k, *, row_end, workspace):
        out = topk_rows_decode(logits, k, row_end=row_end, workspace=workspace)
        ref = topk_rows_reference(logits, k, row_end=row_end)
        assert torch.equal(out.sort(dim=1).values, ref.sort(dim=1).values)
        calls.append(("decode", logits.shape[0], workspace))
        return out

    def rows_spy(logits, k, **kw):   # topk_rows as its reference (exact, fast on CPU)
        calls.append(("rows", logits.shape[0], None))
        return topk_rows_reference(logits, k, **kw)

    monkeypatch.setattr(attention_backend, "topk_rows_decode", decode_spy)
    monkeypatch.setattr(attention_backend, "topk_rows", rows_spy)
    prompts = [torch.randint(0, 512, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (70, 11, 90)]
    params = [greedy(2), greedy(3), greedy(4)]   # decode batches of 3, 2, 1 sequences
    kw = dict(max_model_len=128, max_num_seqs=3, page_size=64)

    eng = make_engine(model, decode_topk_max_rows=2, **kw)
    ws = eng.backend._dtopk
    assert ws.rows == 2 and ws.n == 128
    assert eng.backend.decode_topk_workspace(3) is None and eng.backend.decode_topk_workspace(0) is None
    assert eng.backend.decode_topk_workspace(1) is eng.backend.decode_topk_workspace(1)
    toks, logits = run(eng, prompts, params)
    decode = [c for c in calls if c[0] == "decode"]
    assert [c[1] for c in decode] == [2, 1]
    assert all(c[2].hist.data_ptr() == ws.hist.data_ptr() and c[2].rows == c[1] for c in decode)
    assert ("rows", 3, None) in calls   # the batch of 3: more rows than the workspace holds
    assert not ws.hist.any() and not ws.ctr.any()

    calls.clear()
    off = make_engine(model, decode_topk_max_rows=0, **kw)
    assert off.backend._dtopk is None
    toks_off, logits_off = run(off, prompts, params)
    assert not [c for c in calls if c[0] == "decode"]
    assert toks == toks_off
    for a, b in zip(logits, logits_off):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
