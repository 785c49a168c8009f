"""Quality tools on the committed fixture (tests/fixtures/stdlib-dsa-tiny: 16 layers, trained with
``indexcache train --preset fixture``) and on tiny random models. CPU, a few seconds each."""
import argparse
import json
import os
import struct
import zlib

import pytest
import torch
import torch.nn.functional as F

from indexcache.checkpoint import build_empty, load_model
from indexcache.pattern import IndexPattern
from indexcache.tools.corpus import ByteTokenizer, list_files, load_corpus, split_of
from indexcache.tools.evaluate import evaluate, retrieval_examples
from indexcache.tools.overlap import model_overlap, write_heatmap_png
from indexcache.tools.search import greedy_search
from indexcache.tools.train import TrainConfig, run_stage
from indexcache.tools.trainfwd import (averaged_target_kl, entropy_rows, forward_train, multi_layer_kl,
                                       run_layer_train)

FIXTURE = os.path.join(os.path.dirname(os.path.dirname(__file__)), "fixtures", "stdlib-dsa-tiny")


@pytest.fixture(scope="module")
def fixture_model():
    return load_model(FIXTURE)


@pytest.fixture(scope="module")
def test_corpus():
    return load_corpus("test")


@pytest.fixture(scope="module")
def calib(test_corpus):
    g = torch.Generator().manual_seed(0)
    return list(test_corpus.random_windows(2, 193, g).split(1))  # 2 batches of one 192-token sequence


def _ce(model, batches, pattern):
    nll, n = 0.0, 0
    with torch.no_grad():
        for ids in batches:
            logits = model(ids[:, :-1], pattern=pattern).logits
            nll += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum"))
            n += ids[:, 1:].numel()
    return nll / n


def test_fixture_is_small_and_loads(fixture_model):
    size = sum(os.path.getsize(os.path.join(FIXTURE, f)) for f in os.listdir(FIXTURE))
    assert size <= 16 * 2**20
    cfg = fixture_model.config
    assert cfg.num_layers >= 16 and cfg.index_topk < 512 and cfg.vocab_size == ByteTokenizer.vocab_size
    with open(os.path.join(FIXTURE, "config.json")) as f:
        assert json.load(f)["tokenizer"]["type"] == "bytes"


def test_corpus_split_is_by_file_and_disjoint(test_corpus):
    files = list_files()
    train = {f for f in files if split_of(f) == "train"}
    assert set(test_corpus.files) and not set(test_corpus.files) & train
    part = load_corpus("train", max_bytes=200_000)
    assert set(part.files) <= train and part.files == sorted(part.files)
    assert files == sorted(files)


def test_greedy_search_loss_matches_recomputation_and_brute_force(fixture_model, calib):
    res = greedy_search(fixture_model, calib, 3, progress=False)
    p = res.pattern
    assert isinstance(p, IndexPattern) and p.is_full(0) and len(p.shared_layers) == 3
    for step in res.steps:  # every reported loss is the plain forward's cross-entropy under that pattern
        assert step["loss"] == pytest.approx(_ce(fixture_model, calib, step["pattern"]), rel=1e-5, abs=1e-6)
    assert res.base_loss == pytest.approx(_ce(fixture_model, calib, None), rel=1e-5)
    full = IndexPattern.all_full(16)
    scan = {i: _ce(fixture_model, calib, full.with_shared(i)) for i in range(1, 16)}
    assert res.steps[0]["layer"] == min(scan, key=lambda i: (scan[i], i))
    naive = greedy_search(fixture_model, calib, 3, naive=True, progress=False)
    assert naive.pattern == p
    assert [s["loss"] for s in naive.steps] == pytest.approx([s["loss"] for s in res.steps], rel=1e-6)
    assert res.layer_forwards < naive.layer_forwards == naive.naive_layer_forwards == res.naive_layer_forwards
    out = res.to_json()
    assert out["engine_flags"] == p.engine_flags() and out["layer_forwards_saved"] > 0


def test_proposition_1_gradients_equal_values_differ_by_entropies(fixture_model):
    torch.manual_seed(0)
    B, T, m = 2, 24, 3
    attn = fixture_model.layers[0].self_attn
    x = torch.randn(B, T, fixture_model.config.hidden_size)
    pos = torch.arange(T).expand(B, T)
    cos, sin = fixture_model.rope(pos, x.dtype)
    causal = pos[:, None, :] <= pos[:, :, None]
    targets = [torch.softmax(torch.randn(B, T, T).masked_fill(~causal, float("-inf")) * 2, -1) for _ in range(m)]
    params = list(attn.indexer.parameters())

    def log_q():
        q_resid = attn.q_a_layernorm(attn.q_a_proj(x))
        iq, ik, iw = attn.indexer.project(x, q_resid, cos, sin)
        return torch.log_softmax(attn.indexer.scores(iq, ik, iw).masked_fill(~causal, float("-inf")), -1)

    l_multi = multi_layer_kl(targets, log_q())
    g_multi = torch.autograd.grad(l_multi, params)
    l_avg = averaged_target_kl(targets, log_q())
    g_avg = torch.autograd.grad(l_avg, params)
    for a, b in zip(g_multi, g_avg):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
    p_bar = torch.stack(targets).mean(0)
    const = entropy_rows(p_bar).mean() - sum(entropy_rows(p).mean() for p in targets) / m
    assert float((l_multi - l_avg).detach()) == pytest.approx(float(const), rel=1e-4, abs=1e-6)
    assert float(const) > 0  # Jensen: the averaged target has more entropy


def test_overlap_self_is_one_and_heatmap_png(fixture_model, test_corpus, tmp_path):
    ids = test_corpus.sequential_windows(160, 1)
    ov = model_overlap(fixture_model, [ids])
    assert torch.allclose(ov.diagonal(), torch.ones(16, dtype=ov.dtype))
    assert torch.allclose(ov, ov.T) and float(ov.min()) >= 0
    path = write_heatmap_png(ov, str(tmp_path / "h.png"), cell=4)
    data = open(path, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    w, h = struct.unpack(">II", data[16:24])
    idat = data[data.index(b"IDAT") + 4: data.index(b"IEND") - 8]
    assert len(zlib.decompress(idat)) == h * (1 + 3 * w) and h > 64 and w > 64  # 16 x 4 px cells + label margins


def test_training_forward_matches_model_layer():
    tc = TrainConfig(layers=4, hidden=32, heads=2, q_lora=32, kv_lora=32, nope=16, rope=16, v=16, mlp=64,
                     topk=8, context=64)
    model = build_empty(tc.model_config(), "cpu", torch.float32).init_random(1)
    ids = torch.randint(0, 256, (2, 40))
    pos = torch.arange(40).expand(2, 40)
    h = model.embed(ids)
    cos, sin = model.rope(pos, h.dtype)
    p = IndexPattern("FSFS")
    ht, topk = h, None
    for i in range(4):
        out = run_layer_train(model, i, ht, cos, sin, pos, dense=False, topk_in=None if p.is_full(i) else topk)
        ref, ref_topk = model.run_layer(i, ht, cos, sin, pos, topk, p)
        torch.testing.assert_close(out.h, ref, rtol=1e-5, atol=1e-5)
        assert torch.equal(out.topk, ref_topk)
        ht, topk = out.h, out.topk


def test_training_a_few_steps_reduces_loss():
    tc = TrainConfig(layers=2, hidden=32, heads=2, q_lora=32, kv_lora=32, nope=16, rope=16, v=16, mlp=64,
                     index_heads=2, index_dim=16, topk=16, context=96, batch=8, max_train_bytes=300_000)
    model = build_empty(tc.model_config(), "cpu", torch.float32).init_random(0)
    corpus = load_corpus("train", max_bytes=300_000)
    ids = corpus.random_windows(4, 97, torch.Generator().manual_seed(5))
    before = float(forward_train(model, ids, "dense", index_backward=False)[0])
    run_stage(model, corpus, "dense", 25, 1e-2, tc, torch.Generator().manual_seed(0), progress=False)
    after = float(forward_train(model, ids, "dense", index_backward=False)[0])
    assert after < before - 0.5
    kl0 = forward_train(model, ids, "warmup", index_backward=False)[1]
    run_stage(model, corpus, "warmup", 15, 1e-2, tc, torch.Generator().manual_seed(1), progress=False)
    kl1 = forward_train(model, ids, "warmup", index_backward=False)[1]
    assert kl1 < kl0
    log = run_stage(model, corpus, "sparse", 2, 1e-3, tc, torch.Generator().manual_seed(2), progress=False)
    assert log["steps_done"] == 2 and log["curve"][-1]["index_kl"] is not None


def test_distill_writes_checkpoint_without_shared_indexers(tmp_path):
    from safetensors import safe_open

    from indexcache.tools.distill import distill

    out = str(tmp_path / "d")
    _, log = distill(FIXTURE, "1/4", out, warmup_steps=1, sparse_steps=1, batch=1, context=64,
                     max_train_bytes=200_000)
    p = IndexPattern.keep(16, "1/4")
    assert log["pattern"] == str(p) and log["groups"][1] == [2, 3, 4]
    with safe_open(os.path.join(out, "model.safetensors"), "pt") as f:
        layers_with_indexer = {int(k.split(".")[2]) for k in f.keys() if ".indexer." in k}
    assert layers_with_indexer == set(p.full_layers)
    m = load_model(out)
    assert m.config.pattern == p


def test_retrieval_examples_and_eval(fixture_model, test_corpus):
    ex = retrieval_examples(test_corpus, 256, 4)
    assert len(ex) == 4
    for e in ex:
        assert e["ids"].shape == (256,) and e["ids"][0] == ByteTokenizer.BOS
        assert ByteTokenizer().decode(e["ids"][-e["value_len"]:]) == e["value"]
        tail = ByteTokenizer().decode(e["ids"][-e["value_len"] - len(e["name"]) - 4:])
        assert tail == f"\n{e['name']} = {e['value']}"
    r = evaluate(fixture_model, "1/4", test=test_corpus, context=128, lengths=(256,), n_retrieval=4,
                 heldout_windows=2, recall_seqs=1)
    assert r["num_full"] == 5 and 0 <= r["retrieval"]["256"]["accuracy"] <= 1
    assert r["heldout"]["bits_per_byte"] == pytest.approx(r["heldout"]["loss"] / 0.6931471805599453)
    full = [x for x in r["layers"] if x["type"] == "F"]
    assert all(x["recall_vs_own_indexer"] == 1.0 for x in full)
    assert all(0 <= x["attention_mass_used"] <= 1 + 1e-5 for x in r["layers"])


def test_cli_register_parses_all_subcommands():
    from indexcache.tools.cli import register

    p = argparse.ArgumentParser()
    register(p.add_subparsers(dest="command"))
    for argv in (["train", "--out", "x"], ["overlap", "m", "--png", "a.png"], ["search", "m", "--keep", "1/4"],
                 ["distill", "m", "--pattern", "1/2", "--out", "o"], ["eval", "m", "--patterns", "model", "1/4"]):
        assert callable(p.parse_args(argv).func)


def test_cli_search_json(tmp_path, capsys):
    from indexcache.tools.cli import main

    out = tmp_path / "s.json"
    assert main(["search", FIXTURE, "--target-shared", "1", "--calib-seqs", "1", "--length", "96", "--batch", "1",
                 "--device", "cpu", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["num_full"] == 15 and "sglang" in res["engine_flags"] and len(res["loss_curve"]) == 2
