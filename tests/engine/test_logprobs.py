"""Per-token logprobs from the engine: the model's log-softmax at the sampled token and its top alternatives."""
import torch

from indexcache.sampling import SamplingParams

from .helpers import make_engine, run, tiny_model


def test_logprobs_match_logits():
    model = tiny_model(3)
    eng = make_engine(model, "1/2")
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 512, (n,), generator=g).tolist() for n in (20, 9, 33)]
    params = [SamplingParams(max_tokens=5, temperature=0, ignore_eos=True, logprobs=3),
              SamplingParams(max_tokens=4, temperature=0.8, seed=1, ignore_eos=True, logprobs=0),
              SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)]  # asks for none: records none
    seqs = [eng.add_request(p, sp) for p, sp in zip(prompts, params)]
    logits = {}
    orig = eng._sample

    def rec(lg, ss, rows):
        for s, r in zip(ss, rows):
            logits.setdefault(s.request_id, []).append(lg[r].clone())
        return orig(lg, ss, rows)

    eng._sample = rec
    while eng.has_unfinished():
        eng.step()
    for s in seqs[:2]:
        lp = torch.log_softmax(torch.stack(logits[s.request_id]), -1)
        assert len(s.logprobs) == len(s.output_ids)
        n = s.params.logprobs
        for j, (tok, (chosen, ids, vals)) in enumerate(zip(s.output_ids, s.logprobs)):
            assert abs(chosen - lp[j, tok].item()) < 1e-5
            assert len(ids) == len(vals) == n
            top = lp[j].topk(n) if n else None
            if n:
                assert ids == top.indices.tolist()
                torch.testing.assert_close(torch.tensor(vals, dtype=torch.float64), top.values.double(),
                                           atol=1e-5, rtol=0)
                assert ids[0] == tok  # greedy picks the top token
    assert seqs[2].logprobs == []
    # asking for logprobs does not change the tokens
    plain = make_engine(model, "1/2")
    same = [SamplingParams(max_tokens=p.max_tokens, temperature=p.temperature, seed=p.seed, ignore_eos=True)
            for p in params]
    toks, _ = run(plain, prompts, same)
    assert toks == [s.output_ids for s in seqs]
