"""Greedy search that may choose S or R per layer (tools/search.py, ``max_rerank``), on a tiny random model."""
import pytest
import torch
import torch.nn.functional as F

from indexcache.checkpoint import build_empty
from indexcache.pattern import IndexPattern
from indexcache.tools.search import greedy_search
from indexcache.tools.train import TrainConfig


@pytest.fixture(scope="module")
def model():
    tc = TrainConfig(layers=6, hidden=32, heads=2, q_lora=32, kv_lora=32, nope=16, rope=16, v=16, mlp=64,
                     index_heads=4, index_dim=16, topk=8, context=64)
    return build_empty(tc.model_config(), "cpu", torch.float32).init_random(4)


@pytest.fixture(scope="module")
def calib():
    g = torch.Generator().manual_seed(0)
    return list(torch.randint(0, 256, (2, 49), generator=g).split(1))


def _ce(model, batches, pattern):
    nll, n = 0.0, 0
    with torch.no_grad():
        for ids in batches:
            logits = model(ids[:, :-1], pattern=pattern).logits
            nll += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                         reduction="sum"))
            n += ids[:, 1:].numel()
    return nll / n


def test_search_with_rerank_cached_equals_naive_and_losses_are_real(model, calib):
    res = greedy_search(model, calib, 4, max_rerank=2, pool=12, progress=False)
    p = res.pattern
    assert p.num_full == 2 and p.num_rerank <= 2 and p.pool == 12
    for step in res.steps:
        pat = IndexPattern(step["pattern"], pool=12)
        assert step["loss"] == pytest.approx(_ce(model, calib, pat), rel=1e-5, abs=1e-6)
        assert step["type"] in ("S", "R") and step["pattern"][step["layer"]] == step["type"]
    assert any(k.endswith("R") for k in res.steps[0]["candidate_losses"])
    naive = greedy_search(model, calib, 4, max_rerank=2, pool=12, naive=True, progress=False)
    assert naive.pattern == p
    assert [s["loss"] for s in naive.steps] == pytest.approx([s["loss"] for s in res.steps], rel=1e-6)
    assert res.layer_forwards < naive.layer_forwards


def test_search_without_rerank_is_unchanged(model, calib):
    a = greedy_search(model, calib, 3, progress=False)
    assert a.pattern.num_rerank == 0 and all(s["type"] == "S" for s in a.steps)
    assert all(not k.endswith("R") for k in a.steps[0]["candidate_losses"])
    with pytest.raises(ValueError, match="max_rerank must be an integer >= 0"):
        greedy_search(model, calib, 3, max_rerank=-1, progress=False)
