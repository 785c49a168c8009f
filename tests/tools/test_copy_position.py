"""benchmarks/copy_position.py's long phase on a tiny model: a length curriculum, log-uniform copy distances and
mixed-in short windows run as run_stage draws them, the whole copy stage with --long-share, evaluations at
--eval-steps, and the previous-token heads' layer reported."""
import json

import pytest

from benchmarks.copy_position import main

TINY = ["--layers", "2", "--width", "32", "--heads", "2", "--batch", "1", "--eval-lengths", "64,128", "--windows", "1"]


def _payload(out: str) -> dict:
    return json.loads(next(line for line in out.splitlines() if line.startswith('{"meta"')))


def test_long_phase_curriculum_whole_stage(capsys):
    assert main(TINY + ["--data", "long-phase", "--length", "128,256", "--long-share", "0.5", "--gaps", "log",
                        "--mix", "0.25", "--steps", "4", "--eval-steps", "2"]) == 0
    res = _payload(capsys.readouterr().out)
    assert [r["label"].split(" (")[0] for r in res["results"]] == ["step 2", "step 4"]
    last = res["results"][-1]
    assert set(last["table"]) == {"64", "128"} and all(0 < a < 10 and 0 < b < 10 for a, b in last["table"].values())
    assert last["prev_layer"] in (0, 1) and len(last["heads"]) == 2 and "analysis" in last
    assert res["args"]["length"] == [128, 256] and res["args"]["gaps"] == "log"


def test_several_lengths_only_for_the_long_phase():
    with pytest.raises(SystemExit):
        main(TINY + ["--data", "stage", "--length", "64,128", "--steps", "1"])


def test_distance_eval_save_and_continued_optimizer(tmp_path, capsys):
    """--save writes the model and its optimizer (SAVE.opt); --init/--init-opt continue both; --eval-distances
    bins every copy of the long phase's held-out windows by its distance (12-31, then powers of two)."""
    import torch

    from indexcache.tools.tasks import copy_episode_spans

    save = str(tmp_path / "m.pt")
    assert main(TINY + ["--data", "stage", "--length", "64", "--steps", "2", "--save", save]) == 0
    assert torch.load(save + ".opt")["state"]  # AdamW moments, not an empty state
    capsys.readouterr()
    assert main(TINY + ["--data", "long-phase", "--length", "128", "--steps", "1", "--init", save,
                        "--init-opt", save + ".opt", "--warm", "0", "--eval-distances", "256"]) == 0
    bins = _payload(capsys.readouterr().out)["results"][-1]["by_distance"]["256"]
    spans = copy_episode_spans(257, 1 << 42, 64, 232, gaps="log")[1]  # the one held-out window (--windows 1)
    want = {}
    for src, dst, _ in spans:
        b = 12 if dst - src < 32 else 1 << ((dst - src).bit_length() - 1)
        want[str(b)] = want.get(str(b), 0) + 1
    assert {b: c for b, (_, c) in bins.items()} == want and len(want) >= 2
    assert all(0 < nll < 10 for nll, _ in bins.values())


def test_grow_and_q_scale(tmp_path, capsys):
    """--grow loads a shallower model as the first layers, the new ones computing nothing yet (same outputs);
    without it a model of another depth is refused by name; --q-scale multiplies the query projections."""
    import argparse

    import torch

    from benchmarks.copy_position import build, load_init
    from indexcache.tools.trainfwd import dense_logits

    save = str(tmp_path / "m.pt")
    assert main(TINY + ["--data", "stage", "--length", "64", "--steps", "1", "--save", save]) == 0

    def model(layers, grow=False, q_scale=1.0):
        a = argparse.Namespace(width=32, testbed_shape=False, layers=layers, heads=2, nope=32, rope=16, init_std=None,
                               rope_theta=10000.0, device="cpu", grow=grow, q_scale=q_scale)
        tc, m = build(a, 128)
        m.init_random(3, std=tc.init_std, mlp_out_std=0.02)  # nonzero MLP outputs: --grow must zero them
        load_init(m, save, a)
        return m

    ids = torch.randint(97, 123, (2, 40))
    shallow, deep = model(2), model(3, grow=True)
    assert torch.allclose(dense_logits(shallow, ids), dense_logits(deep, ids), atol=1e-5)
    new = deep.layers[2]
    assert new.self_attn.o_proj.weight.abs().sum() == 0 and new.mlp.down_proj.weight.abs().sum() == 0
    q_b = [m.layers[1].self_attn.q_b_proj.weight for m in (model(2, q_scale=3.0), shallow)]
    assert torch.equal(q_b[0], 3 * q_b[1])
    with pytest.raises(ValueError, match="missing"):
        model(3)


def test_false_match_counts_and_competitor_tables(capsys, monkeypatch):
    """episode_letters counts, per copied token, the places strictly between its source match and the query that
    end with the same last k tokens (checked by brute force); every alphabet holds the same copies; --competitors
    bins every copied token once per k, overall and per distance; --long-alphabet / --eval-alphabets key the
    other alphabets' tables as L@N; a bad alphabet size is refused."""
    import argparse

    from benchmarks.copy_position import build, competitor_table, distance_table, episode_letters
    from indexcache.tools.tasks import copy_alphabet_of, copy_episode_spans

    a = argparse.Namespace(width=32, testbed_shape=False, layers=2, heads=2, nope=32, rope=16, init_std=None,
                           rope_theta=10000.0, device="cpu")
    tc, model = build(a, 512)
    model.init_random(0, std=tc.init_std, mlp_out_std=tc.init_mlp_out_std)
    letters = episode_letters(model, 512, 2, copy_alphabet_of(4))  # 4 symbols: many false matches at every k
    for w in range(2):
        win, spans = copy_episode_spans(513, (1 << 42) + w, 64, 488, alphabet=copy_alphabet_of(4), gaps="log")
        ids = win.tolist()
        got = [r for r in letters if r[0][0] == w]
        want = []
        for c, (src, dst, n) in enumerate(spans):
            for t in range(dst + 3, dst + n - 1):
                m = t - (dst - src)
                want.append(((w, c), dst - src, *[sum(ids[j - k + 1: j + 1] == ids[t - k + 1: t + 1]
                                                     for j in range(m + 1, t)) for k in (1, 2, 3)]))
        assert [(r[0], r[1], *r[4:]) for r in got] == want
    counts = [r[4:] for r in letters]
    assert all(n1 >= n2 >= n3 for n1, n2, n3 in counts) and max(c[2] for c in counts) > 0 \
        and min(c[0] for c in counts) == 0
    other = episode_letters(model, 512, 2)  # letters: the same copies, other text
    assert [r[:2] for r in other] == [r[:2] for r in letters]
    table = competitor_table(letters)
    assert set(table) == {1, 2, 3}
    for k, rows in table.items():
        assert sum(n for _, _, n in rows["all"].values()) == len(letters)
        assert sum(n for w, bins in rows.items() if w != "all" for _, _, n in bins.values()) == len(letters)
        assert all(0 < nll < 10 and 0 <= acc <= 1 for bins in rows.values() for nll, acc, _ in bins.values())
    assert sum(c for _, c in distance_table(letters).values()) == len({r[0] for r in letters})

    import indexcache.tools.train as train_mod

    drawn = []
    real = train_mod.copy_episode_windows
    monkeypatch.setattr(train_mod, "copy_episode_windows",
                        lambda *a, **kw: drawn.append(kw["alphabet"]) or real(*a, **kw))
    assert main(TINY + ["--data", "long-phase", "--length", "128", "--steps", "1", "--long-alphabet", "64",
                        "--eval-alphabets", "26,64", "--eval-distances", "256", "--competitors"]) == 0
    res = _payload(capsys.readouterr().out)["results"][-1]
    assert drawn == [copy_alphabet_of(64)]  # the long phase trained on the 64 symbols
    assert set(res["by_distance"]) == {"256", "256@64"} and set(res["by_false_matches"]) == {"256", "256@64"}
    assert set(res["by_false_matches"]["256@64"]) == {"1", "2", "3"}
    with pytest.raises(SystemExit):
        main(TINY + ["--data", "long-phase", "--length", "128", "--steps", "1", "--long-alphabet", "300"])


def test_placed_copy_rows_free_of_look_alikes(capsys):
    """(e)'s windows: one copy at the asked distance ending 8 tokens before the end; free: no copied symbol between
    source and copy, the same text elsewhere; random: look-alikes between; --free-distances reports both."""
    import torch

    from benchmarks.copy_position import placed_copy_rows
    from indexcache.tools.tasks import copy_alphabet_of

    free = placed_copy_rows(512, 200, 3, copy_alphabet_of(26), True)
    rand = placed_copy_rows(512, 200, 3, copy_alphabet_of(26), False)
    for (f, (src, dst, n)), (r, span) in zip(free, rand):
        assert span == (src, dst, n) and dst - src == 200 and dst + n == 512 - 8 and len(f) == 512
        assert torch.equal(f[dst: dst + n], f[src: src + n]) and torch.equal(r[dst: dst + n], r[src: src + n])
        seg = set(f[src: src + n].tolist())
        assert not seg & set(f[src + n: dst].tolist()) and seg & set(r[src + n: dst].tolist())
        assert torch.equal(f[:src + n], r[:src + n]) and torch.equal(f[dst:], r[dst:])
    with pytest.raises(ValueError, match="distance"):
        placed_copy_rows(512, 600, 1, copy_alphabet_of(26), True)
    assert main(TINY + ["--data", "stage", "--length", "64", "--steps", "1", "--eval-distances", "256",
                        "--free-distances", "32,128,400"]) == 0
    got = _payload(capsys.readouterr().out)["results"][-1]["placed_copy_free_vs_random"]
    assert set(got) == {"256"} and set(got["256"]) == {"32", "128"}  # 400 does not fit a 256-token window
    assert all(0 < x < 10 for pair in got["256"].values() for x in pair)


def test_short_windows_alphabet(monkeypatch):
    """--alphabet N: the stage's windows and the long phase's short (--mix) and long windows in N printable
    characters; more than 95 is refused (copy_alphabet is text)."""
    import benchmarks.copy_position as cp
    import indexcache.tools.train as train_mod
    from indexcache.tools.tasks import copy_alphabet_of

    drawn = []

    def recording(fn):
        return lambda *a, **kw: drawn.append((fn.__name__, kw["alphabet"])) or fn(*a, **kw)

    monkeypatch.setattr(cp, "copy_windows", recording(cp.copy_windows))
    monkeypatch.setattr(train_mod, "copy_windows", recording(train_mod.copy_windows))
    monkeypatch.setattr(train_mod, "copy_episode_windows", recording(train_mod.copy_episode_windows))
    assert main(TINY + ["--data", "stage", "--length", "64", "--steps", "1", "--alphabet", "40"]) == 0
    assert main(TINY + ["--data", "long-phase", "--length", "128", "--steps", "1", "--mix", "0.5",
                        "--alphabet", "40"]) == 0
    want = copy_alphabet_of(40)
    assert drawn == [("copy_windows", want), ("copy_episode_windows", want), ("copy_windows", want)]
    with pytest.raises(SystemExit):
        main(TINY + ["--data", "stage", "--length", "64", "--steps", "1", "--alphabet", "96"])


def test_distract_flags(capsys, monkeypatch):
    """--distract / --distract-match reach the long phase's windows (TrainConfig.copy_long_distract(_match));
    --eval-distract adds (c)/(d) tables in windows with distractors (keys +dN); bad values are refused."""
    import indexcache.tools.train as train_mod

    drawn = []
    real = train_mod.copy_episode_windows
    monkeypatch.setattr(train_mod, "copy_episode_windows",
                        lambda *a, **kw: drawn.append((kw["distract"], kw["distract_match"])) or real(*a, **kw))
    assert main(TINY + ["--data", "long-phase", "--length", "128", "--steps", "1", "--distract", "2",
                        "--distract-match", "3", "--eval-distract", "1", "--eval-distances", "256",
                        "--competitors"]) == 0
    res = _payload(capsys.readouterr().out)["results"][-1]
    assert drawn == [(2, 3)]
    assert set(res["by_distance"]) == {"256", "256+d1"} and set(res["by_false_matches"]) == {"256", "256+d1"}
    for bad in (["--distract", "-1"], ["--eval-distract", "-2"], ["--distract-match", "0"],
                ["--distract-match", "11"]):
        with pytest.raises(SystemExit):
            main(TINY + ["--data", "long-phase", "--length", "128", "--steps", "1"] + bad)


def test_testbed_shape_layers_and_rope_theta():
    """--testbed-shape keeps the retrieval preset's width but takes --layers, --rope and --rope-theta (the preset's
    rope_theta by default; TrainConfig.rope_theta reaches the model config)."""
    import argparse

    from benchmarks.copy_position import build
    from indexcache.tools.train import PRESETS

    a = argparse.Namespace(width=128, testbed_shape=True, layers=8, heads=4, nope=32, rope=None, init_std=None,
                           rope_theta=1e6, device="cpu")
    tc, m = build(a, 64)
    assert (tc.layers, tc.hidden, len(m.layers), m.config.rope_theta) == (8, PRESETS["retrieval"].hidden, 8, 1e6)
    a.layers, a.rope_theta = None, None
    tc, m = build(a, 64)
    assert (len(m.layers), m.config.rope_theta) == (16, PRESETS["retrieval"].rope_theta)


def test_source_offsets_in_the_analysis(capsys):
    """The analysis reports, per layer, attention on the induction source moved by -1..+3 (probabilities)."""
    assert main(TINY + ["--data", "stage", "--length", "64", "--steps", "1"]) == 0
    offs = _payload(capsys.readouterr().out)["results"][-1]["analysis"]["source_offsets"]
    assert set(offs) == {"0", "192"}
    assert all(len(layer) == 5 and all(0 <= x <= 1 for x in layer) for rows in offs.values() for layer in rows)
    assert len(offs["0"]) == 2
