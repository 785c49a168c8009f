import torch

from indexcache.checkpoint import build_empty
from indexcache.presets import preset_config

from indexcache.engine import EngineConfig, LLMEngine
from indexcache.sampling import SamplingParams


def make_engine(model, pattern=None, **kw):
    kw.setdefault("max_model_len", 256)
    kw.setdefault("max_num_seqs", 8)
    return LLMEngine(model, EngineConfig(**kw), index_pattern=pattern)


def run(engine, prompts, params, join_after=None):
    """Generate; returns (token lists, per-request stacked logits). ``join_after``: (steps, prompts, params) added
    while the first requests are running."""
    logits = {}
    orig = engine._sample

    def rec(lg, seqs, rows):
        for s, r in zip(seqs, rows):
            logits.setdefault(s.request_id, []).append(lg[r].clone())
        return orig(lg, seqs, rows)

    engine._sample = rec
    if not isinstance(params, list):
        params = [params] * len(prompts)
    seqs = [engine.add_request(p, sp) for p, sp in zip(prompts, params)]
    steps = 0
    while engine.has_unfinished():
        engine.step()
        steps += 1
        if join_after and steps == join_after[0]:
            seqs += [engine.add_request(p, sp) for p, sp in zip(join_after[1], join_after[2])]
    engine._sample = orig
    return [s.output_ids for s in seqs], [torch.stack(logits[s.request_id]) for s in seqs]


def reference_greedy(model, prompt, n, pattern=None):
    ids, toks, logits = list(prompt), [], []
    with torch.no_grad():
        for _ in range(n):
            lg = model(torch.tensor([ids]), pattern=pattern).logits[0, -1].float()
            tok = int(lg.argmax())
            toks.append(tok)
            logits.append(lg)
            ids.append(tok)
    return toks, torch.stack(logits)


def greedy(n):
    return SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)


def tiny_model(seed=3, pattern=None, index_heads=16):
    """The tiny preset with more indexer heads: with 4 heads ~1/16 of the keys score exactly 0 (all ReLUs off),
    and torch.topk breaks those ties differently for different row lengths; 16 heads make exact ties negligible."""
    cfg = preset_config("tiny").replace(index_n_heads=index_heads)
    if pattern is not None:
        cfg = cfg.with_pattern(pattern)
    return build_empty(cfg, "cpu", torch.float32).init_random(seed).eval()
