"""The indexer loss on sampled query rows (``TrainConfig.index_rows``, trainfwd ``rows``): the sampled rows' logits,
targets and selections are those rows of the all-rows computation, and the loss and indexer gradient are the
all-rows quantities restricted to them."""
import pytest
import torch

from indexcache.checkpoint import build_empty
from indexcache.model.attention import selection_mask
from indexcache.pattern import IndexPattern
from indexcache.tools.train import TrainConfig, indexer_params
from indexcache.tools.trainfwd import (forward_train, index_loss_rows, kl_rows, multi_layer_kl, run_layer_train,
                                       select_in_chunks)

T = 45  # window length of 46 ids


@pytest.fixture(scope="module")
def model():
    tc = TrainConfig(layers=4, hidden=32, heads=2, q_lora=32, kv_lora=32, nope=16, rope=16, v=16, mlp=64,
                     index_heads=3, index_dim=16, topk=8, context=64)
    return build_empty(tc.model_config(), "cpu", torch.float32).init_random(7)


def _inputs(model, seed=3):
    ids = torch.randint(0, 256, (2, T + 1), generator=torch.Generator().manual_seed(seed))
    pos = torch.arange(T).expand(2, T)
    h = model.embed(ids[:, :-1])
    cos, sin = model.rope(pos, h.dtype)
    return ids, pos, h, cos, sin


def test_loss_rows_are_sorted_distinct_and_reproducible():
    a = index_loss_rows(100, 17, torch.Generator().manual_seed(1))
    b = index_loss_rows(100, 17, torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and len(a) == 17 and len(set(a.tolist())) == 17
    assert bool((a[1:] > a[:-1]).all()) and 0 <= int(a[0]) and int(a[-1]) < 100
    assert index_loss_rows(100, None) is None and index_loss_rows(100, 100) is None and index_loss_rows(5, 9) is None
    with pytest.raises(ValueError, match="got 0"):
        index_loss_rows(100, 0)


@pytest.mark.parametrize("chunk", [1, 7, 64])
def test_chunked_selection_equals_whole(model, chunk):
    _, pos, h, cos, sin = _inputs(model)
    layer = model.layers[0]
    x = layer.input_layernorm(h)
    q_resid = layer.self_attn.project(x, cos, sin)[2]
    iq, ik, iw = layer.self_attn.indexer.project(x, q_resid, cos, sin)
    whole = run_layer_train(model, 0, h, cos, sin, pos, dense=False).topk
    torch.testing.assert_close(select_in_chunks(layer.self_attn.indexer, iq, ik, iw, pos, 8, chunk=chunk), whole,
                               rtol=0, atol=0)
    pool = select_in_chunks(layer.self_attn.indexer, iq, ik, iw, pos, 12, chunk=chunk)
    assert torch.equal((pool >= 0).sum(-1), torch.arange(1, T + 1).clamp(max=12).expand(2, T))  # causal rows


@pytest.mark.parametrize("dense", [True, False])
def test_layer_rows_are_rows_of_the_whole(model, dense):
    _, pos, h, cos, sin = _inputs(model)
    rows = torch.tensor([0, 3, 4, 20, 44])
    full = run_layer_train(model, 1, h, cos, sin, pos, dense=dense, want_probs=True, want_index=True, publish=12)
    part = run_layer_train(model, 1, h, cos, sin, pos, dense=dense, want_probs=True, want_index=True, publish=12,
                           rows=rows)
    torch.testing.assert_close(part.h, full.h, rtol=0, atol=0)
    torch.testing.assert_close(part.index_logits, full.index_logits[:, rows], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(part.probs, full.probs[:, rows], rtol=1e-6, atol=1e-7)
    if dense:
        assert part.topk is None
    else:
        assert torch.equal(part.topk, full.topk) and torch.equal(part.pool, full.pool)


def test_rerank_layer_rows_select_within_the_pool(model):
    _, pos, h, cos, sin = _inputs(model)
    f = run_layer_train(model, 0, h, cos, sin, pos, dense=False, publish=12)
    rows = torch.tensor([2, 30, 31])
    full = run_layer_train(model, 2, f.h, cos, sin, pos, dense=False, want_index=True, pool_in=f.pool)
    part = run_layer_train(model, 2, f.h, cos, sin, pos, dense=False, want_index=True, pool_in=f.pool, rows=rows)
    assert torch.equal(part.topk, full.topk)
    torch.testing.assert_close(part.index_logits, full.index_logits[:, rows], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("stage", ["warmup", "sparse"])
def test_sampled_loss_and_gradient_are_the_rows_of_the_whole(model, stage):
    """forward_train with index_rows against the all-rows layer outputs restricted to the same rows, by hand."""
    ids, pos, h, cos, sin = _inputs(model, seed=11)
    p = IndexPattern("FSFS")
    rows = index_loss_rows(T, 9, torch.Generator().manual_seed(5))
    params = indexer_params(model)
    for q in model.parameters():
        q.requires_grad_(False)
    for q in params:
        q.requires_grad_(True)
    try:
        model.zero_grad(set_to_none=True)
        _, got = forward_train(model, ids, stage, p, index_rows=9, gen=torch.Generator().manual_seed(5))
        got_grads = [None if q.grad is None else q.grad.clone() for q in params]  # S layers': None
        model.zero_grad(set_to_none=True)
        losses, ht, topk, group = [], h, None, None
        for i in range(4):
            out = run_layer_train(model, i, ht, cos, sin, pos, dense=stage != "sparse",
                                  topk_in=None if p.is_full(i) else topk, want_probs=True, want_index=p.is_full(i))
            if p.is_full(i):
                if group:
                    losses.append(multi_layer_kl(*group))
                logits = out.index_logits[:, rows]
                if stage == "sparse":
                    logits = logits.masked_fill(~selection_mask(out.topk[:, rows], T), float("-inf"))
                group = ([], torch.log_softmax(logits, -1))
            group[0].append(out.probs[:, rows])
            ht, topk = out.h, out.topk
        losses.append(multi_layer_kl(*group))
        sum(losses).backward()
        want = sum(float(x.detach()) for x in losses) / len(losses)
        assert got == pytest.approx(want, rel=1e-5)
        assert float(kl_rows(group[0][0], group[1]).min()) >= -1e-6
        for g, q in zip(got_grads, params):
            assert (g is None) == (q.grad is None)
            if g is not None:
                torch.testing.assert_close(g, q.grad, rtol=1e-4, atol=1e-7)
        assert sum(float(g.abs().sum()) > 0 for g in got_grads if g is not None) >= 4
    finally:
        for q in model.parameters():
            q.requires_grad_(True)
        model.zero_grad(set_to_none=True)
