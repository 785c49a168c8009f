"""Re-rank (R) layers in the engine (CPU, TorchBackend, exact indexer keys) against the reference model."""
import pytest
import torch

from indexcache.pattern import IndexPattern

from .helpers import greedy, make_engine, reference_greedy, run, tiny_model


@pytest.fixture(scope="module")
def model():
    return tiny_model(3)


def prompt(n, seed):
    return torch.randint(0, 512, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("chunk", [4096, 24], ids=["whole-prefill", "chunked"])
def test_rerank_greedy_equals_reference(model, chunk):
    pat = IndexPattern("FRSRFRSS", pool=48)  # top-k 32 < pool 48 < prompt 70: the pool restricts R layers
    p = prompt(70, 1)
    eng = make_engine(model, pat, max_prefill_tokens=chunk)
    assert eng.plan.pool == 48 and eng.plan[1].reranks and eng.plan[0].publishes_pool == 48
    toks, logits = run(eng, [p], greedy(6))
    ref_toks, ref_logits = reference_greedy(model, p, 6, pattern=pat)
    assert toks[0] == ref_toks
    torch.testing.assert_close(logits[0], ref_logits, atol=2e-4, rtol=1e-4)
    # and it differs from sharing the F layer's selection (the R layers did select on their own)
    _, shared = reference_greedy(model, p, 6, pattern="FSSSFSSS")
    assert not torch.allclose(ref_logits, shared, atol=1e-3)


def test_indexer_cache_for_full_and_rerank_layers_only(model):
    eng = make_engine(model, IndexPattern("FRSSFRSS", pool=40), num_kv_blocks=4)
    assert [c is not None for c in eng.kv.index] == [True, True, False, False, True, True, False, False]
    bpt = eng.cache_bytes
    assert bpt["indexer"] == 4 * model.config.index_head_dim * 4 and bpt["num_indexer_cache_layers"] == 4
    assert bpt["num_full_layers"] == 2
