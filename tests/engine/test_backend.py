"""TritonBackend (the kernels, in Triton's interpreter on CPU) against TorchBackend inside the engine, on a model
with the kernels' shapes (512+64 latent, 128-dim indexer keys). Prompts are shorter than top-k, so FP8 indexer
scores cannot change the selection and the two backends must give the same logits. The Triton top-k runs as its
PyTorch reference here (its interpreter run takes tens of seconds; tests/kernels/ compare the two)."""
import pytest
import torch

from indexcache.checkpoint import build_empty
from indexcache.engine import attention_backend, engine as engine_module
from indexcache.engine.attention_backend import CacheFormats, TorchBackend, TritonBackend
from indexcache.kernels.indexer import topk_rows_torch
from indexcache.kernels._dispatch import interpreting
from indexcache.presets import preset_config

from .helpers import greedy, make_engine, run

pytestmark = pytest.mark.skipif(not interpreting(), reason="needs TRITON_INTERPRET=1 (tests/conftest.py sets it)")


@pytest.fixture(scope="module")
def model():
    cfg = preset_config("tiny").replace(num_layers=2, kv_lora_rank=512, qk_rope_head_dim=64, index_head_dim=128,
                                        index_topk=64, num_heads=2, index_n_heads=2).with_pattern("FS")
    return build_empty(cfg, "cpu", torch.float32).init_random(11).eval()


@pytest.mark.parametrize("latent", ["fp32", "fp8"])
def test_triton_backend_equals_torch_backend(model, latent, monkeypatch):
    prompts = [torch.randint(0, 512, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (11, 4)]
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
    # FP8 latent: the interpreter rounds some e4m3 values of the store kernel one step off the reference quantiser
    tol = 3e-3 if latent == "fp8" else 1e-4
    for a, b in zip(logits, logits_ref):
        torch.testing.assert_close(a, b, atol=tol, rtol=1e-4)
