"""The copy warm-up stage (tools/train.py): on only when asked, trains on pure copy windows of its own size, resumes
exactly, and the testbed plans and orders it."""
import dataclasses

import pytest
import torch

from indexcache.checkpoint import build_empty
from indexcache.tools.corpus import ByteTokenizer, load_corpus
from indexcache.tools.tasks import copy_episode_spans, copy_episode_windows, copy_windows
from tests.tools.stage_resume import assert_resume_equals_uninterrupted
from indexcache.tools.train import (PRESETS, TrainConfig, _lr_at, copy_batch, indexer_params, run_stage, stages,
                                    train)

TINY = TrainConfig(layers=2, hidden=32, heads=2, q_lora=32, kv_lora=32, nope=16, rope=16, v=16, mlp=64,
                   index_heads=2, index_dim=16, topk=16, context=64, batch=2, copy_steps=3, copy_length=128,
                   copy_batch=3, dense_steps=2, warmup_steps=1, sparse_steps=1, max_train_bytes=200_000)


@pytest.fixture(scope="module")
def corpus():
    return load_corpus("train", max_bytes=200_000)


def _fresh(tc=TINY):
    return tc.init_weights(build_empty(tc.model_config(), "cpu", torch.float32))


def test_copy_stage_only_when_asked():
    assert [s for s, _, _ in stages(TINY)] == ["copy", "dense", "warmup", "sparse"]
    assert stages(TINY)[0] == ("copy", 3, TINY.copy_lr)
    for name in ("fixture", "gpu"):  # the other presets train as before
        assert [s for s, _, _ in stages(PRESETS[name])] == ["dense", "warmup", "sparse"]
    assert PRESETS["retrieval"].copy_steps > 0 and PRESETS["retrieval"].copy_long_length[-1] == 4096
    # a testbed run planned before the stage existed has no copy fields in its state: its stage indices still hold
    old = {k: v for k, v in dataclasses.asdict(PRESETS["retrieval"]).items() if not k.startswith("copy_")}
    assert stages(TrainConfig(**old))[0][0] == "dense"
    with pytest.raises(ValueError, match="stage must be one of"):
        run_stage(_fresh(), None, "copyy", 1, 1e-3, TINY, torch.Generator())


def test_dense_stage_copy_rows():
    """copy_share: the first rows of a dense batch become copy windows packed end to end (each starts with <bos>
    and repeats a segment), in copy_alphabet; the other rows and the other stages' batches are left alone."""
    from indexcache.tools.train import _with_copy_rows

    ids = torch.randint(0, 256, (4, 129), generator=torch.Generator().manual_seed(0))
    tc = dataclasses.replace(TINY, copy_share=0.5, copy_length=64, copy_alphabet="xyz")
    out = _with_copy_rows(tc, ids, torch.Generator().manual_seed(1), "dense")
    assert out.shape == ids.shape and torch.equal(out[2:], ids[2:]) and not torch.equal(out[:2], ids[:2])
    for row in out[:2]:
        assert [int(row[j]) for j in (0, 64, 128)] == [256] * 3  # <bos> at each packed window's start
        assert set(row.tolist()) <= set(b"xyz") | {256}
    assert _with_copy_rows(tc, ids, torch.Generator(), "sparse") is ids
    assert _with_copy_rows(TINY, ids, torch.Generator(), "dense") is ids


def test_copy_stage_keeps_its_learning_rate():
    assert [_lr_at(s, 100, 1e-3, decay=False) for s in (0, 19, 50, 99)] == [5e-5, 1e-3, 1e-3, 1e-3]
    assert _lr_at(99, 100, 1e-3) < 1e-5  # the other stages decay to zero


def test_copy_stage_trains_on_copy_windows_of_its_size(corpus):
    model = _fresh()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    g, ref = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    log = run_stage(model, corpus, "copy", 3, 1e-2, TINY, g, progress=False, log_every=1)
    for _ in range(3):  # the stage drew exactly copy_batch copy windows of copy_length (+1 target) per step
        copy_windows(TINY.copy_batch, TINY.copy_length + 1, ref)
    assert torch.equal(g.get_state(), ref.get_state())
    assert log["steps_done"] == 3 and all(r["lm"] is not None for r in log["curve"])
    index = {id(p) for p in indexer_params(model)}
    for n, p in model.named_parameters():  # dense attention: the indexers stay untouched, everything else trains
        assert torch.equal(p, before[n]) == (id(p) in index), n


def test_copy_stage_long_windows_last(corpus, monkeypatch):
    """copy_long_length: the last copy_long_share of the steps draw long episode windows (one copy episode per
    copy_length tokens), as many tokens per step; the steps before, and every step without it, are unchanged."""
    import indexcache.tools.train as train_mod

    drawn = []

    def recording(fn):
        def draw(n, length, gen, **kw):
            out = fn(n, length, gen, **kw)
            drawn.append((fn.__name__, tuple(out.shape), kw.get("every"), kw.get("max_gap")))
            return out
        return draw

    monkeypatch.setattr(train_mod, "copy_windows", recording(copy_windows))
    monkeypatch.setattr(train_mod, "copy_episode_windows", recording(copy_episode_windows))
    tc = dataclasses.replace(TINY, copy_long_length=384, copy_long_share=0.5)
    log = run_stage(_fresh(tc), corpus, "copy", 4, 1e-2, tc, torch.Generator().manual_seed(4), progress=False,
                    log_every=1)
    short, long = ("copy_windows", (3, 129), None, None), ("copy_episode_windows", (1, 385), 128, 360)
    assert drawn == [short, short, long, long]
    assert log["steps_done"] == 4 and all(r["lm"] is not None for r in log["curve"])
    g, ref = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    assert torch.equal(copy_batch(TINY, 3, 4, g), copy_windows(3, 129, ref))  # off by default
    for bad, match in (({"copy_long_share": 1.5}, "copy_long_share"), ({"copy_long_length": 128}, "copy_long_length")):
        with pytest.raises(ValueError, match=match):
            copy_batch(dataclasses.replace(tc, **bad), 0, 8, g)


def test_copy_episode_windows():
    """About (length - 1) // every episodes, each a run and its exact copy after a gap <= max_gap, no two runs sharing a
    position, distances spread up to max_gap; deterministic in the seed; bad shapes are refused by name."""
    gaps, counts = [], []
    for seed in range(20):
        win, spans = copy_episode_spans(513, seed, every=64, max_gap=300)
        assert win.shape == (513,) and win[0] == ByteTokenizer.BOS and 6 <= len(spans) <= 8 and spans == sorted(spans)
        counts.append(len(spans))
        taken = [p for src, dst, n in spans for p in list(range(src, src + n)) + list(range(dst, dst + n))]
        assert len(taken) == len(set(taken)) == len(spans) * 24 and min(taken) >= 1 and max(taken) <= 512
        for src, dst, n in spans:
            assert n == 12 and torch.equal(win[src: src + n], win[dst: dst + n])
            gaps.append(dst - src - n)
    assert sum(counts) >= 7.5 * 20  # a crowded window may give up on an episode, rarely
    assert min(gaps) >= 0 and max(gaps) <= 300 and min(gaps) < 60 and max(gaps) > 240
    win, spans = copy_episode_spans(513, 7, 64, 300)
    assert torch.equal(copy_episode_spans(513, 7, 64, 300)[0], win)
    assert not torch.equal(copy_episode_spans(513, 8, 64, 300)[0], win)
    with pytest.raises(ValueError, match="every"):
        copy_episode_spans(513, 7, every=20, max_gap=40)
    with pytest.raises(ValueError, match="max gap"):
        copy_episode_spans(513, 7, every=64, max_gap=500)
    g = torch.Generator().manual_seed(0)
    assert copy_episode_windows(3, 200, g, every=64, max_gap=40).shape == (3, 200)


def test_copy_stage_resumed_equals_uninterrupted(corpus):
    assert_resume_equals_uninterrupted("copy", TINY, _fresh, corpus)


def test_train_runs_the_copy_stage_first():
    _, log = train(TINY, progress=False)
    assert [(s["stage"], s["steps_done"]) for s in log["stages"]] == [("copy", 3), ("dense", 2), ("warmup", 1),
                                                                      ("sparse", 1)]


def test_testbed_plan_leaves_the_copy_stage_and_splits_the_rest(monkeypatch):
    import benchmarks.retrieval_testbed as tb

    clock = [0.0]  # a fake clock: every stage's step takes exactly 10 ms, whatever else the machine runs
    timed = []

    def timed_step(model, corpus, stage, steps, *a, **k):
        timed.append(stage)
        clock[0] += 0.01 * steps

    monkeypatch.setattr(tb, "run_stage", timed_step)
    monkeypatch.setattr(tb.time, "perf_counter", lambda: clock[0])
    planned = tb.plan_steps(dataclasses.replace(TINY, copy_steps=10 ** 6), 100.0, "cpu", None)
    assert "copy" not in timed and planned.copy_steps == 10 ** 6  # the copy warm-up is never cut
    assert (planned.dense_steps, planned.warmup_steps, planned.sparse_steps) == (7200, 800, 2000)  # SHARES of 100 s
    assert tb.plan_steps(TINY, 0.0, "cpu", None) == TINY  # no budget: the config's own counts


def test_dense_stage_copy_episode_rows():
    """copy_rows "episodes": the copy rows are long-phase windows of the batch's length (one copy per copy_length
    tokens at copy_long_gaps distances, some far back), in copy_alphabet; the other rows are left alone."""
    from indexcache.tools.train import _with_copy_rows

    ids = torch.randint(0, 256, (4, 1025), generator=torch.Generator().manual_seed(0))
    tc = dataclasses.replace(TINY, copy_share=0.25, copy_length=64, copy_alphabet="xyz", copy_rows="episodes",
                             copy_long_gaps="log")
    out = _with_copy_rows(tc, ids, torch.Generator().manual_seed(1), "dense")
    assert torch.equal(out[1:], ids[1:]) and int(out[0, 0]) == 256 and set(out[0, 1:].tolist()) <= set(b"xyz")
    seed = torch.randint(0, 1 << 31, (1,), generator=torch.Generator().manual_seed(1)).item()
    win, spans = copy_episode_spans(1025, seed, 64, 1025 - 1 - 24, alphabet=b"xyz", gaps="log")
    assert torch.equal(out[0], win) and len(spans) >= 12 and max(d - s for s, d, _ in spans) > 128
    with pytest.raises(ValueError, match="copy_rows must be one of"):
        _with_copy_rows(dataclasses.replace(tc, copy_rows="long"), ids, torch.Generator(), "dense")


def test_copy_reach_extension(corpus, monkeypatch):
    """copy_reach_nats: after the copy stage, blocks of long-window steps while the measured reach is above it, at
    most copy_reach_blocks a phase; none when it is met; then the same per alphabet of copy_reach_alphabets, each
    measured and trained in its own symbols; resumable from its state; checked up front."""
    import indexcache.tools.train as train_mod
    from indexcache.tools.tasks import copy_alphabet_of
    from indexcache.tools.train import copy_rows_alphabet, extend_copy

    tc = dataclasses.replace(TINY, copy_long_length=(256,), copy_reach_nats=1.0, copy_reach_block=2,
                             copy_reach_blocks=3)
    reach, measured, trained = iter([3.0, 2.0, 0.5, 9.9]), [], []  # above, above, met: two blocks
    real_run_stage = train_mod.run_stage

    def spy(model, corpus, stage, steps, lr, tc_, *a, **k):
        trained.append((k["start_step"], steps, tc_.copy_long_alphabet, tc_.copy_long_share))
        return real_run_stage(model, corpus, stage, steps, lr, tc_, *a, **k)

    def fake_reach(model, length, alphabet, **k):
        measured.append((length, alphabet))
        return next(reach)

    monkeypatch.setattr(train_mod, "copy_reach", fake_reach)
    monkeypatch.setattr(train_mod, "run_stage", spy)
    state = {}
    done, opt = extend_copy(_fresh(tc), corpus, tc, torch.Generator().manual_seed(0), state)
    assert done and state == {"phase": 1, "blocks": 0, "step": 4, "reach": [[3.0, 2.0, 0.5]]} and opt is not None
    assert trained == [(0, 2, None, 1.0), (2, 4, None, 1.0)] and measured == [(256, tc.copy_alphabet.encode())] * 3
    reach, state = iter([5.0] * 9), {}
    assert extend_copy(_fresh(tc), corpus, tc, torch.Generator(), state)[0] and state["reach"] == [[5.0] * 4]  # cap
    # alphabets: letters met at once, then 40 symbols after one block, then 62 at once
    tc2 = dataclasses.replace(tc, copy_reach_alphabets=(40, 62))
    reach, measured, trained, state = iter([0.5, 2.0, 0.9, 0.2]), [], [], {}
    assert extend_copy(_fresh(tc2), corpus, tc2, torch.Generator(), state)[0]
    assert state["reach"] == [[0.5], [2.0, 0.9], [0.2]] and trained == [(0, 2, 40, 1.0)]
    assert [a for _, a in measured] == [tc.copy_alphabet.encode(), copy_alphabet_of(40), copy_alphabet_of(40),
                                        copy_alphabet_of(62)]
    assert copy_rows_alphabet(tc2) == copy_alphabet_of(62) and copy_rows_alphabet(tc) == tc.copy_alphabet.encode()
    # cut by a deadline in its first block: not finished, and the next call continues where it stopped
    reach, state, model = iter([5.0, 0.1]), {}, _fresh(tc)
    assert extend_copy(model, corpus, tc, torch.Generator(), state, deadline=0.0)[0] is False
    assert state == {"phase": 0, "blocks": 0, "step": 0, "reach": [[5.0]]}
    assert extend_copy(model, corpus, tc, torch.Generator(), state)[0] and state["reach"] == [[5.0, 0.1]]
    for bad, match in ((dict(copy_long_length=None), "needs a copy stage"),
                       (dict(copy_reach_block=0), "copy_reach_block"),
                       (dict(copy_reach_blocks=-1), "copy_reach_blocks"), (dict(copy_rows="x"), "copy_rows"),
                       (dict(copy_reach_alphabets=(300,)), "copy_reach_alphabets")):
        with pytest.raises(ValueError, match=match):
            stages(dataclasses.replace(tc, **bad))


def test_copy_reach_scores_copies_across_the_window():
    """probe.copy_reach: the mean NLL of every copied letter past its cue in the held-out windows."""
    from indexcache.tools.probe import copy_reach

    from indexcache.tools.probe import REACH_SEED_BASE
    from indexcache.tools.trainfwd import dense_logits

    model = _fresh(dataclasses.replace(TINY, context=256))
    nll = copy_reach(model, 256, windows=2, batch=1)
    assert 2.0 < nll < 8.0
    picked = []  # by hand: the held-out windows, the letters of each copy past its 4-letter cue
    for i in range(2):
        win, spans = copy_episode_spans(257, REACH_SEED_BASE + i, 64, 256 - 24, gaps="log")
        logp = torch.log_softmax(dense_logits(model, win[None, :-1])[0].float(), -1)
        picked += [-logp[t, win[t + 1]] for _, dst, n in spans for t in range(dst + 3, dst + n - 1)]
    assert abs(nll - float(torch.stack(picked).mean())) < 1e-4
    with pytest.raises(ValueError, match="length >= 4 x every"):
        copy_reach(model, 128, windows=1)


def test_copy_long_phase_curriculum_mix_and_log_gaps(corpus, monkeypatch):
    """copy_long_length as increasing lengths: the long phase's steps split evenly among them, shortest first, as
    many tokens a step; copy_long_mix adds that share of short copy windows as a second batch of the long steps
    (run_stage runs both); copy_long_gaps reaches copy_episode_windows; bad values are refused by name."""
    import indexcache.tools.train as train_mod
    from indexcache.tools.train import copy_batches, copy_window_length

    tc = dataclasses.replace(TINY, copy_length=64, copy_batch=12, copy_long_length=(192, 384), copy_long_share=0.5)
    assert [copy_window_length(tc, s, 8) for s in range(8)] == [64] * 4 + [192] * 2 + [384] * 2
    shapes = [tuple(b.shape) for s in range(8) for b in copy_batches(tc, s, 8, torch.Generator().manual_seed(s))]
    assert shapes == [(12, 65)] * 4 + [(4, 193)] * 2 + [(2, 385)] * 2
    mixed = dataclasses.replace(tc, copy_long_mix=0.5)
    assert [tuple(b.shape) for b in copy_batches(mixed, 7, 8, torch.Generator())] == [(1, 385), (6, 65)]
    assert [tuple(b.shape) for b in copy_batches(mixed, 0, 8, torch.Generator())] == [(12, 65)]  # short phase

    drawn = []

    def recording(fn):
        def draw(n, length, gen, **kw):
            drawn.append((fn.__name__, n, length, kw.get("gaps")))
            return fn(n, length, gen, **kw)
        return draw

    monkeypatch.setattr(train_mod, "copy_windows", recording(copy_windows))
    monkeypatch.setattr(train_mod, "copy_episode_windows", recording(copy_episode_windows))
    small = dataclasses.replace(TINY, copy_length=64, copy_batch=4, copy_long_length=(128, 256), copy_long_share=0.5,
                                copy_long_mix=0.5, copy_long_gaps="log")
    log = run_stage(_fresh(small), corpus, "copy", 4, 1e-2, small, torch.Generator().manual_seed(4),
                    progress=False, log_every=1)
    assert drawn == [("copy_windows", 4, 65, None)] * 2 + [("copy_episode_windows", 1, 129, "log"),
                                                             ("copy_windows", 2, 65, None),
                                                             ("copy_episode_windows", 1, 257, "log"),
                                                             ("copy_windows", 2, 65, None)]
    assert log["steps_done"] == 4 and all(r["lm"] is not None and r["lm"] > 0 for r in log["curve"])
    for bad, match in (({"copy_long_length": (384, 192)}, "increasing"), ({"copy_long_length": (64, 384)}, "above"),
                       ({"copy_long_mix": 1.0}, "copy_long_mix"), ({"copy_long_gaps": "square"}, "copy_long_gaps")):
        with pytest.raises(ValueError, match=match):
            copy_batch(dataclasses.replace(tc, **bad), 0, 8, torch.Generator())  # refused from the first step


def test_copy_episode_log_gaps():
    """gaps "log": valid episodes whose copy distances are log-uniform (as many at 12-120 tokens as at 120-1200),
    so a long window keeps short copies; deterministic; uniform gaps give the short ones rarely."""
    def distances(gaps):
        return [dst - src for seed in range(12) for src, dst, n in copy_episode_spans(2049, seed, 64, 2000,
                                                                                     gaps=gaps)[1]]
    log, uni = distances("log"), distances("uniform")
    for seed in range(3):
        win, spans = copy_episode_spans(2049, seed, 64, 2000, gaps="log")
        for src, dst, n in spans:
            assert n == 12 and dst - src >= 12 and torch.equal(win[src: src + n], win[dst: dst + n])
    assert len(log) >= 25 * 12 and min(log) >= 12 and max(log) <= 2012
    short, mid = sum(d < 120 for d in log) / len(log), sum(120 <= d < 1200 for d in log) / len(log)
    assert 0.3 < short < 0.6 and 0.3 < mid < 0.6 and sum(d < 120 for d in uni) / len(uni) < 0.1
    assert torch.equal(copy_episode_spans(2049, 5, 64, 2000, gaps="log")[0],
                       copy_episode_spans(2049, 5, 64, 2000, gaps="log")[0])
    with pytest.raises(ValueError, match="gaps"):
        copy_episode_spans(2049, 5, 64, 2000, gaps="exp")


def test_copy_long_alphabet():
    """copy_long_alphabet: the long windows' text in that many distinct byte tokens (letters first, 26 = the
    letters), the short windows still in copy_alphabet; None changes nothing; a bad size is refused by name."""
    from indexcache.tools.tasks import COPY_ALPHABET, copy_alphabet_of

    assert copy_alphabet_of(26) == COPY_ALPHABET and copy_alphabet_of(3) == b"abc"
    big = copy_alphabet_of(200)
    assert len(set(big)) == 200 and big[:62].isalnum() and sorted(copy_alphabet_of(256)) == list(range(256))
    for bad in (1, 257, True, 26.0):
        with pytest.raises(ValueError, match="alphabet size"):
            copy_alphabet_of(bad)
    tc = dataclasses.replace(TINY, copy_length=64, copy_batch=8, copy_long_length=512, copy_long_share=0.5)
    wide = dataclasses.replace(tc, copy_long_alphabet=200)

    def text(t, step):
        return set(copy_batch(t, step, 4, torch.Generator().manual_seed(step))[:, 1:].flatten().tolist())

    assert text(wide, 3) - set(big) == set() and len(text(wide, 3)) > 150  # the long window: 512 tokens of 200
    assert text(wide, 0) <= set(COPY_ALPHABET) and text(tc, 3) <= set(COPY_ALPHABET)  # short windows, default
    assert torch.equal(copy_batch(tc, 3, 4, torch.Generator().manual_seed(1)),  # 26: the default's windows
                       copy_batch(dataclasses.replace(tc, copy_long_alphabet=26), 3, 4,
                                  torch.Generator().manual_seed(1)))
    with pytest.raises(ValueError, match="copy_long_alphabet"):
        copy_batch(dataclasses.replace(tc, copy_long_alphabet=300), 0, 4, torch.Generator())


def _false_matches(win, spans, k: int) -> float:
    """Mean, over the copied tokens past a 4-token cue, of the places strictly between the source match and the
    query that end with the same last k tokens (brute force)."""
    ids, total, count = win.tolist(), 0, 0
    for src, dst, n in spans:
        for t in range(dst + 3, dst + n - 1):
            last = ids[t - k + 1: t + 1]
            total += sum(ids[j - k + 1: j + 1] == last for j in range(t - (dst - src) + 1, t))
            count += 1
    return total / count


def test_copy_distractors():
    """tasks.copy_distractor_spans: 0 distractors draw copy_episode_spans's windows exactly, more the same copies
    and text elsewhere; each distractor is a
    near-copy of its copy's segment before the copy (between source and copy when they are a segment apart),
    equal to it except at every (match + 1)-th offset, so it repeats the segment's runs of `match` tokens each
    followed by a wrong one and never `match` + 1 aligned tokens; the copied tokens meet many more false matches
    of their last 2 tokens than in plain windows, and not of their last 3; bad values are refused by name."""
    from indexcache.tools.tasks import copy_distractor_spans

    plain2, plain3, dis2, dis3, seen = [], [], [], [], 0
    for seed in range(6):
        win0, spans0 = copy_episode_spans(1025, seed, 64, 1000, gaps="log")
        w, s, d = copy_distractor_spans(1025, seed, 64, 1000, gaps="log")
        assert torch.equal(w, win0) and s == spans0 and d == []
        win, spans, dis = copy_distractor_spans(1025, seed, 64, 1000, gaps="log", distract=2)
        assert spans == spans0 and len(dis) >= 1.2 * len(spans) >= 16  # the same copies, and their distractors
        off = {at + i for at, _, _ in dis for i in range(12)}
        assert all(int(win[j]) == int(win0[j]) for j in range(1025) if j not in off)  # nothing else changed
        taken = sorted([(a, a + n) for a, b, n in spans] + [(b, b + n) for a, b, n in spans]
                       + [(at, at + 12) for at, _, _ in dis])
        assert all(e <= b for (_, e), (b, _) in zip(taken, taken[1:]))  # nothing overlaps
        copies = {a: b for a, b, _ in spans}
        for at, src, first in dis:
            dst = copies[src]
            assert 1 <= at <= dst - 12 and (dst - src < 24 or src + 12 <= at)
            same = [int(win[at + i]) == int(win[src + i]) for i in range(12)]
            assert same == [(i - first) % 3 != 0 for i in range(12)]
            for i in range(12):
                if i >= 2 and not same[i]:  # a 2-token look-alike of the segment followed by a wrong token
                    assert same[i - 1] and same[i - 2] and not (i >= 3 and same[i - 3])
            seen += sum(i >= 2 and not same[i] for i in range(12))
        plain2.append(_false_matches(win0, spans0, 2))
        plain3.append(_false_matches(win0, spans0, 3))
        dis2.append(_false_matches(win, spans, 2))
        dis3.append(_false_matches(win, spans, 3))
    assert seen > 300
    assert sum(dis2) > 1.8 * sum(plain2) and sum(dis3) < 2 * sum(plain3) + 0.05 * len(dis3)
    win, spans, dis = copy_distractor_spans(1025, 0, 64, 1000, gaps="log", distract=1, distract_match=3)
    for at, src, first in dis:  # runs of 3: every 4th token mutated
        assert [int(win[at + i]) == int(win[src + i]) for i in range(12)] == [(i - first) % 4 != 0 for i in range(12)]
    assert torch.equal(copy_episode_windows(2, 257, torch.Generator().manual_seed(3), 64, 200, distract=1),
                       torch.stack([copy_episode_spans(257, s, 64, 200, distract=1)[0] for s in
                                    torch.randint(0, 1 << 31, (2,), generator=torch.Generator().manual_seed(3))]))
    for kw, match in (({"distract": -1}, "distractors per copy"), ({"distract": True}, "distractors per copy"),
                      ({"distract": 1, "distract_match": 0}, "matched run"),
                      ({"distract": 1, "distract_match": 11}, "matched run")):
        with pytest.raises(ValueError, match=match):
            copy_distractor_spans(1025, 0, 64, 1000, **kw)


def test_copy_long_distract():
    """TrainConfig.copy_long_distract: the long phase's windows hold that many distractors per copy (the same
    windows as tasks.copy_episode_windows with distract), the short windows none; 0 (default) changes nothing;
    bad values are refused by name from the first step."""
    tc = dataclasses.replace(TINY, copy_length=64, copy_batch=8, copy_long_length=512, copy_long_share=0.5,
                             copy_long_gaps="log")
    on = dataclasses.replace(tc, copy_long_distract=2, copy_long_distract_match=3)
    got = copy_batch(on, 3, 4, torch.Generator().manual_seed(1))
    want = copy_episode_windows(1, 513, torch.Generator().manual_seed(1), every=64, max_gap=488, gaps="log",
                                distract=2, distract_match=3)
    assert torch.equal(got, want)
    assert not torch.equal(got, copy_batch(tc, 3, 4, torch.Generator().manual_seed(1)))
    assert torch.equal(copy_batch(tc, 3, 4, torch.Generator().manual_seed(1)),
                       copy_episode_windows(1, 513, torch.Generator().manual_seed(1), every=64, max_gap=488,
                                            gaps="log"))
    assert torch.equal(copy_batch(on, 0, 4, torch.Generator().manual_seed(1)),  # the short phase: unchanged
                       copy_batch(tc, 0, 4, torch.Generator().manual_seed(1)))
    for bad, match in (({"copy_long_distract": -1}, "copy_long_distract must"),
                       ({"copy_long_distract": 1.0}, "copy_long_distract must"),
                       ({"copy_long_distract_match": 0}, "copy_long_distract_match"),
                       ({"copy_long_distract_match": 11}, "copy_long_distract_match")):
        with pytest.raises(ValueError, match=match):
            copy_batch(dataclasses.replace(tc, **bad), 0, 4, torch.Generator())
