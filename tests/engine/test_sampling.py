import pytest
import torch

from indexcache.engine.sampler import sample, uniform_noise
from indexcache.llm import LLM
from indexcache.sampling import SamplingParams

from .helpers import tiny_model, make_engine, run


def _t(v, dt):
    return torch.tensor(v, dtype=dt)


def test_sampler_filters():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 100, generator=g)
    top = logits.argmax(-1)
    # greedy row, top_k=1, tiny top_p, and a free row
    out = sample(logits, _t([0, 1.0, 1.0, 1.0], torch.float32), _t([1, 1, 1e-6, 1], torch.float32),
                 _t([0, 1, 0, 0], torch.int64), _t([1, 2, 3, 4], torch.int64), _t([0, 0, 0, 0], torch.int64))
    assert out[:3].tolist() == top[:3].tolist()
    # top_k=5 only ever picks among the 5 best
    many = torch.stack([sample(logits[:1], _t([2.0], torch.float32), _t([1.0], torch.float32), _t([5], torch.int64),
                               _t([s], torch.int64), _t([0], torch.int64)) for s in range(200)])
    assert set(many.flatten().tolist()) <= set(logits[0].topk(5).indices.tolist())


def test_unfiltered_fast_path_equals_full_path():
    # the engine skips the vocabulary sort when no request uses top-k/top-p; the draws must not change
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(6, 300, generator=g) * 3
    args = (_t([0, 0.5, 1.0, 1.0, 2.0, 0.7], torch.float32), _t([1.0] * 6, torch.float32), _t([0] * 6, torch.int64),
            _t([3, 1, 4, 1, 5, 9], torch.int64), _t([0, 2, 7, 1, 8, 2], torch.int64))
    for step in range(5):
        a = sample(logits + step, *args, filtered=True)
        b = sample(logits + step, *args, filtered=False)
        assert a.tolist() == b.tolist()


def test_sampler_follows_distribution():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2]]))
    draws = torch.cat([sample(logits, _t([1.0], torch.float32), _t([1.0], torch.float32), _t([0], torch.int64),
                              _t([s], torch.int64), _t([0], torch.int64)) for s in range(3000)])
    freq = torch.bincount(draws, minlength=3).float() / 3000
    torch.testing.assert_close(freq, torch.tensor([0.5, 0.3, 0.2]), atol=0.04, rtol=0)


def test_noise_is_uniform_and_keyed():
    u = uniform_noise(_t([7, 7, 8], torch.int64), _t([0, 1, 0], torch.int64), 50000)
    assert 0 < u.min() and u.max() < 1 and abs(u.mean() - 0.5) < 0.01
    assert not torch.equal(u[0], u[1]) and not torch.equal(u[0], u[2])


@pytest.fixture(scope="module")
def model():
    return tiny_model(4)


def test_seeded_sampling_is_reproducible_alone_or_batched(model):
    p1, p2 = [5] * 30, list(range(40, 90))
    sp = SamplingParams(max_tokens=8, temperature=0.9, top_p=0.9, top_k=50, seed=123, ignore_eos=True)
    other = SamplingParams(max_tokens=5, temperature=1.0, seed=9, ignore_eos=True)
    alone = run(make_engine(model), [p1], sp)[0][0]
    again = run(make_engine(model), [p1], sp)[0][0]
    batched = run(make_engine(model), [p2, p1], [other, sp])[0][1]
    assert alone == again == batched
    diff = run(make_engine(model), [p1], SamplingParams(max_tokens=8, temperature=0.9, seed=124,
                                                         ignore_eos=True))[0][0]
    assert diff != alone


def test_llm_api():
    llm = LLM("tiny", "1/2", max_model_len=128, max_num_seqs=4, seed=1)
    outs = llm.generate([[1, 2, 3, 4], list(range(10, 50))], SamplingParams(max_tokens=4, temperature=0,
                                                                            ignore_eos=True))
    assert [len(o.outputs[0].token_ids) for o in outs] == [4, 4]
    assert outs[0].outputs[0].finish_reason == "length" and outs[0].prompt_token_ids == [1, 2, 3, 4]
    assert llm.cache_bytes_per_token()["num_full_layers"] == llm.pattern.num_full
    with pytest.raises(ValueError, match="token ids"):
        llm.generate(["hello"])
    assert llm.generate([7, 8, 9], SamplingParams(max_tokens=2, temperature=0))[0].outputs[0].token_ids
