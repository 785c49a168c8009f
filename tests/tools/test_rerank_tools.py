"""Quality tools with re-rank (R) layers on a tiny random model: greedy search choosing S or R per layer
(tools/search.py, ``max_rerank``), the training forward and distillation of R-layer indexers."""
import pytest
import torch
import torch.nn.functional as F

from indexcache.checkpoint import build_empty, load_model, save_checkpoint
from indexcache.pattern import IndexPattern
from indexcache.tools.search import greedy_search
from indexcache.tools.train import TrainConfig
from indexcache.tools.trainfwd import forward_train, run_layer_train


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


def test_training_forward_with_rerank_matches_model_layers(model):
    ids = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(2))
    pos = torch.arange(40).expand(2, 40)
    h = model.embed(ids)
    cos, sin = model.rope(pos, h.dtype)
    p = IndexPattern("FRSRFS", pool=12)
    ht, sel = h, None
    pool = None
    for i in range(6):
        out = run_layer_train(model, i, ht, cos, sin, pos, dense=False,
                              topk_in=None if p.has_indexer(i) else sel.topk,
                              pool_in=pool if p.is_rerank(i) else None, publish=12 if p.is_full(i) else None)
        ref, sel = model.run_layer(i, ht, cos, sin, pos, sel, p)
        torch.testing.assert_close(out.h, ref, rtol=1e-5, atol=1e-5)
        assert torch.equal(out.topk, sel.topk)
        if p.is_full(i):
            pool = out.pool
            assert torch.equal(pool, sel.pool)
        ht = out.h


def test_distill_trains_rerank_indexers(model, tmp_path):
    from safetensors import safe_open

    from indexcache.tools.distill import distill

    src, out = str(tmp_path / "src"), str(tmp_path / "out")
    save_checkpoint(model, src)
    before = model.layers[1].self_attn.indexer.wq_b.weight.clone()
    m, log = distill(src, "FRSRFS", out, warmup_steps=1, sparse_steps=1, batch=1, context=48,
                     max_train_bytes=100_000)
    assert log["pattern"] == "FRSRFS" and log["rerank"] == {0: [1, 3]} and log["groups"][1] == [2]
    assert all(s["steps_done"] == 1 and s["curve"][-1]["index_kl"] is not None for s in log["stages"])
    assert not torch.equal(m.layers[1].self_attn.indexer.wq_b.weight, before)  # the R indexer trained
    with safe_open(f"{out}/model.safetensors", "pt") as f:
        layers = {int(k.split(".")[2]) for k in f.keys() if ".indexer." in k}
    assert layers == {0, 1, 3, 4}
    assert str(load_model(out).config.pattern) == "FRSRFS"
