"""Logits equal transformers' DeepseekV32ForCausalLM / GlmMoeDsaForCausalLM on tiny random checkpoints."""
import pytest
import torch

import indexcache
from indexcache import IndexPattern

from .hf_reference import hf_model, rel_err

pytest.importorskip("transformers")

SEQ = 29  # > index_topk (7), not a multiple of anything


def _compare(hf, path, ids, **load_kw):
    hf.save_pretrained(path)
    ours = indexcache.load_model(str(path), **load_kw)
    with torch.no_grad():
        ref = hf(ids).logits
        out = ours(ids).logits
    assert out.shape == ref.shape
    err = rel_err(out, ref)
    assert err <= 1e-4, f"relative error {err:.2e}"
    return ours


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_deepseek_v32_yarn_matches_transformers(tmp_path, seed):
    hf = hf_model("deepseek_v32", seed)
    ids = torch.randint(0, hf.config.vocab_size, (2, SEQ), generator=torch.Generator().manual_seed(seed))
    ours = _compare(hf, tmp_path, ids)
    assert ours.config.family == "deepseek_v32"
    assert ours.config.rope_scaling is not None and not ours.config.indexer_rope_interleaved
    assert ours.pattern.num_full == hf.config.num_hidden_layers


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_glm_moe_dsa_matches_transformers(tmp_path, seed):
    hf = hf_model("glm_moe_dsa", seed)
    ids = torch.randint(0, hf.config.vocab_size, (2, SEQ), generator=torch.Generator().manual_seed(seed + 10))
    ours = _compare(hf, tmp_path, ids)
    assert ours.config.indexer_rope_interleaved


def test_selection_matters():
    """With top-k far below the sequence, restricting attention changes the output (the test can fail)."""
    hf = hf_model("glm_moe_dsa", 0)
    ids = torch.randint(0, hf.config.vocab_size, (1, SEQ))
    dense = hf_model("glm_moe_dsa", 0, index_topk=SEQ)
    with torch.no_grad():
        assert rel_err(hf(ids).logits, dense(ids).logits) > 1e-3


@pytest.mark.parametrize("key,value", [
    ("index_topk_pattern", "FSSFS"),
    ("indexer_types", ["full", "full", "shared", "full", "shared"]),
    ("index_topk_freq", 2),
])
def test_glm_shared_patterns_match_transformers(tmp_path, key, value):
    hf = hf_model("glm_moe_dsa", 3, **{key: value})
    ids = torch.randint(0, hf.config.vocab_size, (2, SEQ), generator=torch.Generator().manual_seed(3))
    ours = _compare(hf, tmp_path, ids)
    assert str(ours.pattern) == "".join("F" if t == "full" else "S" for t in hf.config.indexer_types)
    assert ours.pattern.num_full < hf.config.num_hidden_layers
    for i in ours.pattern.shared_layers:
        assert ours.layers[i].self_attn.indexer is None


@pytest.mark.parametrize("spec", ["FSFSS", "1/2", IndexPattern("FFSSF")])
def test_pattern_given_to_load_model_only(tmp_path, spec):
    """A checkpoint with every indexer, loaded with a shared pattern, equals transformers built with that pattern."""
    full = hf_model("glm_moe_dsa", 4)
    full.save_pretrained(tmp_path)
    pattern = IndexPattern.parse(spec, full.config.num_hidden_layers)
    shared = hf_model("glm_moe_dsa", 4, index_topk_pattern=str(pattern))
    missing, unexpected = shared.load_state_dict(full.state_dict(), strict=False)
    assert not missing and all(".indexer." in k for k in unexpected)
    ours = indexcache.load_model(str(tmp_path), index_pattern=spec)
    ids = torch.randint(0, full.config.vocab_size, (2, SEQ))
    with torch.no_grad():
        err = rel_err(ours(ids).logits, shared(ids).logits)
        differs = rel_err(ours(ids).logits, full(ids).logits)
    assert err <= 1e-4
    assert differs > 1e-4  # the pattern really changed the computation
    assert ours.indexer_bytes_saved() > 0


def test_absorbed_form_equals_masked_form(tmp_path):
    hf = hf_model("deepseek_v32", 5)
    hf.save_pretrained(tmp_path)
    ours = indexcache.load_model(str(tmp_path))
    ids = torch.randint(0, hf.config.vocab_size, (2, SEQ))
    with torch.no_grad():
        assert rel_err(ours(ids, attn_impl="absorbed").logits, ours(ids).logits) <= 1e-5


def test_return_topk_gives_every_layer(tmp_path):
    hf = hf_model("glm_moe_dsa", 6, index_topk_pattern="FSSFS")
    hf.save_pretrained(tmp_path)
    ours = indexcache.load_model(str(tmp_path))
    ids = torch.randint(0, hf.config.vocab_size, (1, SEQ))
    with torch.no_grad():
        out = ours(ids, return_topk=True)
    k = hf.config.index_topk
    assert len(out.topk_indices) == 5 and all(t.shape == (1, SEQ, k) for t in out.topk_indices)
    assert torch.equal(out.topk_indices[1], out.topk_indices[0]) and torch.equal(out.topk_indices[2], out.topk_indices[0])
    assert torch.equal(out.topk_indices[4], out.topk_indices[3])
    first = out.topk_indices[0][0]
    assert (first[0, 1:] == -1).all() and first[0, 0] == 0  # query 0 sees only itself; the rest is padding
    valid = first[first >= 0]
    assert valid.numel() > 0
