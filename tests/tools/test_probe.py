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
