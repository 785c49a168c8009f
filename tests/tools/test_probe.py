"""The copy probe (tools/probe.py): near zero for a model that copies, near or above ln 16 for one that cannot."""
import pytest
import torch

from indexcache.tools.corpus import load_corpus
from indexcache.tools.probe import HEX_CHANCE, copy_probe


class _Oracle(torch.nn.Module):
    """Predicts, at every position, the byte that followed the latest earlier occurrence of the last 4 bytes: an
    ideal induction head (and uniform over bytes where there is none)."""

    def forward(self, ids, pattern=None):
        B, T = ids.shape
        logits = torch.zeros(B, T, 259)
        for b in range(B):
            row = ids[b].tolist()
            seen = {}
            for t in range(T):
                if t >= 4:
                    key = tuple(row[t - 3: t + 1])
                    if key in seen:
                        logits[b, t, row[seen[key] + 1]] = 30.0
                    if t + 1 < T:
                        seen[key] = t
        return type("Out", (), {"logits": logits})()


class _Uniform(torch.nn.Module):
    def forward(self, ids, pattern=None):
        return type("Out", (), {"logits": torch.zeros(*ids.shape, 259)})()


@pytest.fixture(scope="module")
def corpus():
    return load_corpus("test")


def test_copy_probe_separates_a_copier_from_a_non_copier(corpus):
    good = copy_probe(_Oracle(), corpus, length=400, distances=(40, 200), per_distance=2)
    bad = copy_probe(_Uniform(), corpus, length=400, distances=(40, 200), per_distance=2)
    assert good["nll"] < 0.05 and set(good["nll_by_distance"]) == {"40", "200"}
    assert bad["nll"] > HEX_CHANCE and good["chance"] == pytest.approx(HEX_CHANCE)


def test_copy_probe_rejects_bad_sizes(corpus):
    with pytest.raises(ValueError, match="too short for distance 800"):
        copy_probe(_Uniform(), corpus, length=500)
    with pytest.raises(ValueError, match="cue must be in"):
        copy_probe(_Uniform(), corpus, length=400, distances=(40,), cue=40)


def test_dense_probe_is_the_model_with_every_key(corpus):
    """dense=True scores with dense attention (trainfwd.dense_logits): the model's own forward when its top-k keeps
    every key, and not what an untrained indexer's small top-k gives."""
    import dataclasses

    from indexcache.checkpoint import build_empty
    from indexcache.tools.train import TrainConfig

    tc = TrainConfig(layers=2, hidden=32, heads=2, q_lora=32, kv_lora=32, nope=16, rope=16, v=16, mlp=64,
                     index_heads=2, index_dim=16, topk=512, init_std=0.1)
    model = tc.init_weights(build_empty(tc.model_config(), "cpu", torch.float32)).eval()
    small = build_empty(dataclasses.replace(tc, topk=8).model_config(), "cpu", torch.float32).eval()
    small.load_state_dict(model.state_dict())
    kw = dict(length=400, distances=(40, 200), per_distance=2)
    dense = copy_probe(small, corpus, dense=True, **kw)
    assert dense["nll"] == pytest.approx(copy_probe(model, corpus, **kw)["nll"], rel=1e-4)
    assert abs(dense["nll"] - copy_probe(small, corpus, **kw)["nll"]) > 1e-3
