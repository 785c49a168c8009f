"""Re-rank (R) layers: F/S/R patterns (parse, validate, describe, export), the plan's roles, and the reference
model forward (an R layer scores only its F layer's candidate pool with its own indexer)."""
import pytest
import torch

from indexcache.checkpoint import build_empty
from indexcache.config import ModelConfig
from indexcache.model import Selection
from indexcache.model.indexer import causal_mask, select_topk
from indexcache.pattern import IndexPattern, LayerPlan, LayerRole, PatternError
from indexcache.presets import preset_config


def test_pattern_parses_validates_and_resolves_sources():
    p = IndexPattern("FRSRFSR")
    assert str(p) == "FRSRFSR" and p.rerank_layers == [1, 3, 6] and p.num_full == 2 and p.num_rerank == 3
    assert [p.source(i) for i in range(7)] == [0, 1, 1, 3, 4, 4, 6]  # S copies the nearest F or R
    assert [p.pool_source(i) for i in range(7)] == [0, 0, 0, 0, 4, 4, 4]
    assert p.served_by(1) == [2] and p.served_by(4) == [5] and p.reranked_by(0) == [1, 3]
    assert p.indexer_layers == [0, 1, 3, 4, 6] and p.has_indexer(3) and not p.has_indexer(2)
    assert IndexPattern.parse("FRSRFSR", 7) == p and p.with_rerank(2) == IndexPattern("FRRRFSR")
    assert IndexPattern("FSSS").with_rerank(1).with_shared(1) == IndexPattern("FSSS")
    with pytest.raises(PatternError, match="starts with 'R'"):
        IndexPattern("RFF")
    with pytest.raises(PatternError, match="'F', 'S' and 'R'; found 'X' at layer 1"):
        IndexPattern("FXS")
    with pytest.raises(PatternError, match="pool size must be a positive integer"):
        IndexPattern("FR", pool=0)
    assert IndexPattern("FR", pool=64) != IndexPattern("FR") and IndexPattern("FR", pool=64).pool == 64
    # pure F/S patterns: sources as before (the nearest F)
    assert [IndexPattern("FFSSFS").source(i) for i in range(6)] == [0, 1, 1, 1, 4, 4]


def test_describe_export_and_cost_say_what_r_is():
    p = IndexPattern("FRSSFR", pool=256)
    text = p.describe()
    assert "2 of 6 layers run the indexer over every token, 2 re-rank" in text and "top-256" in text
    assert "F0 pool -> R 1" in text and "R1 -> S 2-3" in text
    flags = p.engine_flags()
    assert all(v.startswith("not supported") and "re-rank (R) layers [1, 5]" in v for v in flags.values())
    with pytest.raises(PatternError, match="indexer_types has no equivalent"):
        p.indexer_types()
    assert p.indexer_cost(4096, 256) == pytest.approx((2 + 2 * 256 / 4096) / 6)
    assert IndexPattern("FFSS").indexer_cost(4096, 256) == 0.5
    cfg = preset_config("tiny").with_pattern("FRSSFRSS")
    d = cfg.to_hf_dict()
    assert d["index_topk_pattern"] == "FRSSFRSS" and "indexer_types" not in d
    assert ModelConfig.from_hf_dict(d).pattern == IndexPattern("FRSSFRSS")


def test_layer_plan_roles_with_rerank():
    plan = LayerPlan(IndexPattern("FRSFS"), pool=128)
    assert plan[0] == LayerRole(True, 0, False, -1, 128) and plan[3] == LayerRole(True, 3)  # F3 serves no R
    assert plan[1] == LayerRole(True, 1, True, 0, 0) and plan[2] == LayerRole(False, 1)
    assert plan.num_indexed == 3 and plan.pool == 128
    with pytest.raises(PatternError, match="give the candidate pool size"):
        LayerPlan(IndexPattern("FR"))
    assert LayerPlan(IndexPattern("FS")).pool is None and LayerPlan(IndexPattern("FR", pool=9)).pool == 9


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_empty(preset_config("tiny"), "cpu", torch.float32).init_random(2)


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 512, (2, 80), generator=torch.Generator().manual_seed(1))


def test_rerank_with_a_pool_of_everything_equals_full(model, ids):
    # pool >= T: every causal key is a candidate, so R selects what F would
    a = model(ids, pattern="FRRRRRRR", pool=80).logits
    b = model(ids, pattern="all").logits
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_rerank_with_a_pool_of_k_equals_shared(model, ids):
    # pool == k: the R layer's top-k of the F layer's top-k is that set, as an S layer would copy it
    k = model.config.index_topk
    a = model(ids, pattern="FRFRFRFR", pool=k).logits
    b = model(ids, pattern="FSFSFSFS").logits
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_rerank_layer_selects_its_own_top_k_inside_the_pool(model, ids):
    p = IndexPattern("FRSSSSSS")
    B, T = ids.shape
    pos = torch.arange(T).expand(B, T)
    h = model.embed(ids)
    cos, sin = model.rope(pos, h.dtype)
    h0, sel0 = model.run_layer(0, h, cos, sin, pos, None, p, pool=48)
    assert isinstance(sel0, Selection) and sel0.pool.shape == (B, T, 48)
    assert sel0.topk.shape == (B, T, 32) and set(sel0.topk[0, -1].tolist()) <= set(sel0.pool[0, -1].tolist())
    _, sel1 = model.run_layer(1, h0, cos, sin, pos, sel0, p, pool=48)
    # brute force: layer 1's own exact scores, restricted to the pool
    attn = model.layers[1].self_attn
    x = model.layers[1].input_layernorm(h0)
    q_resid = attn.q_a_layernorm(attn.q_a_proj(x))
    s = attn.indexer.scores(*attn.indexer.project(x, q_resid, cos, sin))
    in_pool = torch.zeros(B, T, T, dtype=torch.bool)
    for b in range(B):
        for t in range(T):
            row = sel0.pool[b, t]
            in_pool[b, t, row[row >= 0].long()] = True
    want = select_topk(s, causal_mask(pos, pos) & in_pool, 32)
    assert torch.equal(sel1.topk.sort(-1).values, want.sort(-1).values)
    assert torch.equal(sel1.pool, sel0.pool)
    chosen = sel1.topk[sel1.topk >= 0]
    assert bool((chosen < T).all())
    # a query at position t with more than 48 visible keys: all chosen keys come from its pool
    t = T - 1
    assert set(sel1.topk[0, t].tolist()) <= set(sel0.pool[0, t].tolist())


def test_rerank_needs_indexer_weights_and_a_valid_pool(model, ids):
    shared = build_empty(preset_config("tiny").with_pattern("FSFSFSFS"), "meta", torch.float32)
    with pytest.raises(PatternError, match=r"marks layers \[1\] re-rank \(R\), which needs the layer's own indexer"):
        shared.layer_plan("FRFSFSFS")
    assert str(shared.layer_plan("FSRSFSFS")) == "FSRSFSFS" and shared.layer_plan("FSRSFSFS").pool == 128
    with pytest.raises(PatternError, match="integer >= top-k"):
        model(ids, pattern="FRFSFSFS", pool=8)
    assert model.layer_plan("FRFSFSFS", pool=40).pool == 40
