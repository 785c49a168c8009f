"""Synthetic retrieval tasks (tools/tasks.py): exact lengths, the facts really are far from the query, the answer
is recoverable from the text, determinism, held-out separation, the training mix."""
import re

import pytest
import torch

from indexcache.tools.corpus import ByteTokenizer, load_corpus
from indexcache.tools.tasks import (COPY_ALPHABET, COPY_SEGMENT, HELDOUT_SEED_BASE, TASKS, copy_window_spans,
                                   copy_windows, make_item, make_items, mixed_windows, packed_window,
                                   task_weights_for)

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


def test_packed_window_episodes_answerable_from_earlier_text(train_corpus):
    """Every query in a packed window is followed by the answer a perfect retriever computes from the text before
    it; the length is exact; at most one passkey; deterministic in its seed."""
    w = packed_window(train_corpus, 4096, 11)
    assert w.shape == (4096,) and int(w[0]) == ByteTokenizer.BOS and torch.equal(w, packed_window(train_corpus, 4096, 11))
    assert not torch.equal(w, packed_window(train_corpus, 4096, 12))
    text = bytes(w[1:].tolist()).decode("utf-8", "replace")
    lines = text.split("\n")
    queries = 0
    for j, line in enumerate(lines):
        # a query line: one of our generated names (or the passkey) and the answer right after it
        m = re.match(r"(assert \w+_[0-9a-f]{8}(?:\[\"key_[0-9a-f]{8}\"\])? == \[?|# the passkey is )(\d[\d, ]*\]?)$",
                     line)
        if not m:
            continue
        before = "\n".join(lines[:j]) + "\n" + m.group(1)
        task = ("passkey" if m.group(1).startswith("#") else "kv_multivalue" if m.group(1).endswith("[")
                else "kv_single" if "[" in m.group(1) else "vartrack_or_needle")
        if task == "vartrack_or_needle":  # follow assignments back to a number
            name = re.fullmatch(r"assert (\w+) == ", m.group(1)).group(1)
            while not re.fullmatch(r"\d+", name):
                name = re.findall(rf"^{name} = (\w+)$", before, re.M)[-1]
            want = name
        else:
            want = _solve(task, before)
        assert m.group(2) == want, (line, want)
        queries += 1
    assert queries >= 4096 // 256 // 2, f"only {queries} episodes in a 4096-token packed window"
    assert text.count(". Remember it.") <= 1
    rows = mixed_windows(train_corpus, 3, 1024, 1.0, torch.Generator().manual_seed(0), packed=True)
    assert rows.shape == (3, 1024) and all(len(re.findall(rb"== ", bytes(r[1:].tolist()))) >= 2 for r in rows)
    with pytest.raises(ValueError, match="packed window length"):
        packed_window(train_corpus, 100, 0)
    with pytest.raises(ValueError, match="tokens per episode must be an integer >= 16, got 4"):
        packed_window(train_corpus, 512, 0, tokens_per_episode=4)
    with pytest.raises(ValueError, match=r"task share .* got 1.5"):
        packed_window(train_corpus, 512, 0, task_share=1.5)
    dense = packed_window(train_corpus, 1024, 3, tokens_per_episode=32, task_share=0.9)
    assert len(re.findall(rb" == |passkey is \d+\n", bytes(dense[1:].tolist()))) > \
        len(re.findall(rb" == |passkey is \d+\n", bytes(packed_window(train_corpus, 1024, 3)[1:].tolist())))


def _episode_kinds(window: torch.Tensor) -> dict:
    """Queries per kind in a packed window's text: passkey, table lookups (kv_single / kv_multikey), registries
    (kv_multivalue), plain names (needle_multi / vartrack)."""
    text = bytes(window[1:].tolist())
    return {"passkey": len(re.findall(rb"\n# the passkey is \d+\n", text)),
            "table": len(re.findall(rb"\nassert TABLE_", text)), "reg": len(re.findall(rb"\nassert REG_", text)),
            "name": len(re.findall(rb"\nassert (?:NEEDLE|var)_", text))}


def test_task_weights_steer_the_packed_mix(train_corpus):
    """Weights decide which tasks a packed window's episodes are: weight 0 never drawn, a heavy task most often;
    None is the old draw (every task alike); bad weights named in the error."""
    only = packed_window(train_corpus, 4096, 5, weights={"kv_single": 1.0, "kv_multikey": 1.0})
    k = _episode_kinds(only)
    assert k["table"] >= 8 and k["passkey"] == k["reg"] == k["name"] == 0, k
    assert torch.equal(packed_window(train_corpus, 4096, 5), packed_window(train_corpus, 4096, 5, weights=None))
    heavy = [_episode_kinds(packed_window(train_corpus, 4096, s, weights=(("kv_multivalue", 8.0), ("vartrack", 1.0))))
             for s in range(4)]
    assert sum(h["reg"] for h in heavy) > 3 * sum(h["name"] for h in heavy) > 0
    assert sum(h["table"] + h["passkey"] for h in heavy) == 0
    # the passkey alone: one episode (a second passkey would make both queries ambiguous), then no more
    assert _episode_kinds(packed_window(train_corpus, 4096, 1, weights={"passkey": 1.0}))["passkey"] == 1
    rows = mixed_windows(train_corpus, 2, 1024, 1.0, torch.Generator().manual_seed(0), packed=True,
                         weights={"vartrack": 1.0})
    assert all(_episode_kinds(r)["name"] >= 2 and _episode_kinds(r)["table"] == 0 for r in rows)
    single = mixed_windows(train_corpus, 3, 512, 1.0, torch.Generator().manual_seed(0), weights={"passkey": 1.0})
    assert all(_episode_kinds(r)["passkey"] == 0 and b"# the passkey is " in bytes(r[1:].tolist()) for r in single)
    assert task_weights_for(TASKS, None) is None
    assert task_weights_for(("kv_single", "vartrack"), [["vartrack", 2]]) == [0.0, 2.0]  # JSON's lists of pairs
    with pytest.raises(ValueError, match=r"unknown tasks \['kv_double'\]"):
        task_weights_for(TASKS, {"kv_double": 1.0})
    with pytest.raises(ValueError, match=r"numbers >= 0, got \{'passkey': -1\}"):
        task_weights_for(TASKS, {"passkey": -1})
    with pytest.raises(ValueError, match="no positive weight"):
        packed_window(train_corpus, 1024, 0, tasks=("kv_single",), weights={"passkey": 1.0})


def test_copy_windows_repeat_earlier_text_and_are_not_degenerate():
    """Each window repeats one earlier segment of its random text exactly (and nothing is scored as a copy that is
    not one); the text and the copy distances vary across seeds; deterministic in the seed; bad arguments refused."""
    dist = []
    for seed in range(40):
        w, spans = copy_window_spans(65, seed)
        assert w.shape == (65,) and int(w[0]) == ByteTokenizer.BOS and int(w[1:].max()) < 256
        assert torch.equal(w, copy_window_spans(65, seed)[0])
        [(src, dst, n)] = spans
        assert n == COPY_SEGMENT and 1 <= src < 33 and src + n <= dst and dst + n <= 65
        assert torch.equal(w[dst: dst + n], w[src: src + n]), (seed, src, dst)
        text = set(w[1:].tolist())
        assert len(text) >= 12 and text <= set(COPY_ALPHABET)  # random letters, not one repeated byte
        dist.append(dst - src)
    assert min(dist) <= 16 and max(dist) >= 40
    w, [(src, dst, n)] = copy_window_spans(257, 7, segment=32)
    assert n == 32 and torch.equal(w[dst: dst + 32], w[src: src + 32])
    assert not torch.equal(copy_window_spans(65, 0)[0], copy_window_spans(65, 1)[0])
    g0, g1 = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    rows = copy_windows(3, 257, g0)
    assert rows.shape == (3, 257) and torch.equal(rows, copy_windows(3, 257, g1)) and not torch.equal(rows[0], rows[1])
    with pytest.raises(ValueError, match="copy window length must be an integer >= 4 x the segment"):
        copy_window_spans(47, 0)
    with pytest.raises(ValueError, match="copy segment length must be an integer >= 2, got 1"):
        copy_window_spans(512, 0, segment=1)
    # another alphabet: only its bytes, the same copy structure
    w, [(src, dst, n)] = copy_window_spans(65, 3, alphabet=b"0123456789")
    assert set(w[1:].tolist()) <= set(b"0123456789") and torch.equal(w[dst: dst + n], w[src: src + n])
    with pytest.raises(ValueError, match="copy alphabet needs at least 2 distinct bytes"):
        copy_window_spans(65, 3, alphabet=b"a")
    # a sub-window: the copy and its source within `inner` tokens, at offsets spread over the window
    ends = []
    for seed in range(30):
        w, [(src, dst, n)] = copy_window_spans(257, seed, inner=65)
        assert torch.equal(w[dst: dst + n], w[src: src + n]) and src + n <= dst and dst + n - src <= 64
        ends.append(dst + n)
    assert min(ends) < 100 and max(ends) > 200 and max(ends) <= 257
    with pytest.raises(ValueError, match="copy sub-window must be in"):
        copy_window_spans(257, 0, inner=300)
