"""``indexcache demo``: the embedded default job. Builds the ``tiny`` preset on the CPU, runs full DSA and
IndexCache patterns on the same tokens, and shows cross-layer top-k overlap and what each pattern saves."""
from __future__ import annotations

import os
import time

import torch

from .checkpoint import load_model
from .pattern import IndexPattern
from .tokenizer import ByteTokenizer, find_tokenizer
from .tools.overlap import pairwise_overlap


def _demo_tokens(model_name: str, vocab: int, seq_len: int, seed: int):
    """Held-out Python source for checkpoints with our byte tokenizer, else random token ids."""
    if os.path.isdir(model_name):
        if isinstance(find_tokenizer(model_name), ByteTokenizer):
            from .tools.corpus import load_corpus

            corpus = load_corpus("test", max_bytes=4 * seq_len)
            return corpus.sequential_windows(seq_len, 1), f"trained weights from {model_name}, held-out stdlib text"
        weights = f"weights from {model_name}"
    else:
        weights = f"random weights, seed {seed}"
    ids = torch.randint(0, vocab, (1, seq_len), generator=torch.Generator().manual_seed(seed))
    return ids, f"{weights}, random token ids"


def run_demo(model_name: str = "tiny", seq_len: int = 384, seed: int = 0, patterns=("1/2", "1/4"),
             out=print) -> dict:
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    full = load_model(model_name, seed=seed)
    cfg = full.config
    ids, source = _demo_tokens(model_name, cfg.vocab_size, seq_len, seed)
    with torch.no_grad():
        ref = full(ids, return_topk=True)
    k = cfg.index_topk
    ov = pairwise_overlap(ref.topk_indices)
    out(f"model {model_name}: {cfg.num_layers} layers, {cfg.num_heads} heads, indexer {cfg.index_n_heads}x"
        f"{cfg.index_head_dim}, top-k {k}, {seq_len} tokens ({source})")
    out(f"\ntop-k overlap |T_i ∩ T_j| / k with the next layers (queries that see more than {k} tokens):")
    out("layer  " + "  ".join(f"+{d}" for d in (1, 2, 3)))
    for i in range(cfg.num_layers):
        cells = [f"{ov[i, i + d]:.2f}" if i + d < cfg.num_layers else "  - " for d in (1, 2, 3)]
        out(f"{i:5d}  " + "  ".join(cells))
    # two independent random choices of k among t tokens share k/t on average
    chance = sum(k / t for t in range(k + 1, seq_len + 1)) / max(seq_len - k, 1)
    out(f"(chance level for unrelated selections: {chance:.2f}; the paper's trained 30B DSA model shares 70-100%"
        " between adjacent layers)")

    results = {"model": model_name, "seq_len": seq_len, "overlap": ov.tolist(), "patterns": []}
    out(f"\n{'pattern':<12} {'F layers':>8} {'indexer work':>13} {'indexer bytes saved':>20} "
        f"{'logit rel. diff':>16} {'top-1 agree':>12}")
    base_logits = ref.logits
    for spec in ("all", *patterns):
        p = IndexPattern.parse(spec, cfg.num_layers)
        with torch.no_grad():
            logits = full(ids, pattern=p).logits
        # indexer cost is the same in every F layer (O(T^2) scores + top-k), so work scales with the F count
        work = p.num_full / cfg.num_layers
        saved = len(p.shared_layers) * full.indexer_param_bytes_per_layer()
        diff = float((logits - base_logits).norm() / base_logits.norm())
        agree = float((logits.argmax(-1) == base_logits.argmax(-1)).float().mean())
        out(f"{spec:<12} {p.num_full:>8} {work:>12.0%} {saved:>17,} B {diff:>16.3f} {agree:>12.1%}")
        results["patterns"].append({"spec": spec, "pattern": str(p), "num_full": p.num_full,
                                    "indexer_work": work, "indexer_bytes_saved": saved,
                                    "logit_rel_diff": diff, "top1_agree": agree})
    for spec in patterns:
        p = IndexPattern.parse(spec, cfg.num_layers)
        out(f"\nkeep {spec}: {p.describe()}")
    out(f"\ndone in {time.perf_counter() - t0:.1f}s")
    return results
