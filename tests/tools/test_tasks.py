"""Synthetic retrieval tasks (tools/tasks.py): exact lengths, the facts really are far from the query, the answer
is recoverable from the text, determinism, held-out separation, the training mix."""
import re

import pytest
import torch

from indexcache.tools.corpus import ByteTokenizer, load_corpus
from indexcache.tools.tasks import HELDOUT_SEED_BASE, TASKS, make_item, make_items, mixed_windows

H = HELDOUT_SEED_BASE


@pytest.fixture(scope="module")
def test_corpus():
    return load_corpus("test")


@pytest.fixture(scope="module")
def train_corpus():
    return load_corpus("train", max_bytes=400_000)


def _solve(task: str, text: str) -> str:
    """The answer recomputed from the prompt text alone (what a perfect retriever would write)."""
    q = text.rsplit("\n", 1)[1]
    if task == "passkey":
        return re.search(r"# the passkey is (\d+)\. Remember it\.", text).group(1)
    if task in ("kv_single", "kv_multikey"):
        t, k = re.fullmatch(r'assert (\w+)\["(\w+)"\] == ', q).groups()
        return re.search(rf'{t} = {{.*"{k}": (\d+)', text).group(1)
    if task == "needle_multi":
        n = re.fullmatch(r"assert (\w+) == ", q).group(1)
        return re.search(rf"^{n} = (\d+)$", text, re.M).group(1)
    if task == "kv_multivalue":
        r, k = re.fullmatch(r'assert (\w+)\["(\w+)"\] == \[', q).groups()
        return ", ".join(re.findall(rf'{r}\["{k}"\]\.append\((\d+)\)', text)) + "]"
    if task == "vartrack":
        n = re.fullmatch(r"assert (\w+) == ", q).group(1)
        for _ in range(5):
            v = re.search(rf"^{n} = (\w+)$", text, re.M).group(1)
            if v.isdigit():
                return v
            n = v
    raise AssertionError(task)


@pytest.mark.parametrize("length", [512, 2048])
def test_items_have_exact_length_and_a_recoverable_distant_answer(test_corpus, length):
    for task in TASKS:
        for i in range(3):
            it = make_item(test_corpus, task, length, H, i)
            ids = it.ids()
            assert ids.shape == (length,) and ids[0] == ByteTokenizer.BOS and int(ids[1:].max()) < 256
            text = bytes(it.prompt[1:]).decode("utf-8", errors="replace")
            assert _solve(task, text) == it.answer.decode(), (task, i)
            if task != "needle_multi":  # the fact holding the (first) value sits early, far from the query
                first_value = it.answer.decode().split(",")[0].rstrip("]")
                assert text.index(first_value) < 0.15 * length + 200 < len(text) - 200


def test_deterministic_and_heldout_separated(test_corpus, train_corpus):
    a = make_items(test_corpus, TASKS, 512, 2, H + 7, heldout=True)
    b = make_items(test_corpus, TASKS, 512, 2, H + 7, heldout=True)
    assert [x.prompt for x in a] == [x.prompt for x in b] and [x.answer for x in a] == [x.answer for x in b]
    c = make_items(test_corpus, TASKS, 512, 2, H + 8, heldout=True)
    assert sum(x.answer != y.answer for x, y in zip(a, c)) >= len(a) - 2
    with pytest.raises(ValueError, match="held-out task seeds start"):
        make_items(test_corpus, TASKS, 512, 1, 5, heldout=True)
    with pytest.raises(ValueError, match="held-out range"):
        make_items(train_corpus, TASKS, 512, 1, H, heldout=False)
    with pytest.raises(ValueError, match="'test' split"):
        make_items(train_corpus, TASKS, 512, 1, H, heldout=True)
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        make_item(test_corpus, "nope", 512, H, 0)
    with pytest.raises(ValueError, match="length must be an integer >= 256"):
        make_item(test_corpus, "passkey", 100, H, 0)


def test_mixed_windows_ratio(train_corpus):
    g0, g1 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(mixed_windows(train_corpus, 4, 300, 0.0, g0), train_corpus.random_windows(4, 300, g1))
    rows = mixed_windows(train_corpus, 6, 600, 1.0, torch.Generator().manual_seed(0))
    assert rows.shape == (6, 600) and bool((rows[:, 0] == ByteTokenizer.BOS).all())
    texts = [bytes(r[1:].tolist()).decode("utf-8", "replace") for r in rows]
    assert all(re.search(r"_[0-9a-f]{8}|passkey", t) for t in texts)
    with pytest.raises(ValueError, match="ratio must be in"):
        mixed_windows(train_corpus, 1, 300, 1.5, torch.Generator())
