"""IndexPattern: the freq/offset formula, parsing, validation errors and self-description."""
import pytest

from indexcache import IndexPattern, PatternError


def test_uniform_freq4_47_layers_matches_reference_patch():
    # the IndexCache SGLang/vLLM patches (index_topk_freq=4): F at layers 0, 1, 5, 9, ..., 45 -> 13 full layers
    expected = "FF" + "SSSF" * 11 + "S"
    p = IndexPattern.uniform(47, 4)
    assert str(p) == expected and len(expected) == 47
    assert p.full_layers == [0, 1] + list(range(5, 47, 4)) and p.num_full == 13


def test_uniform_other_freqs_and_offsets():
    assert str(IndexPattern.uniform(10, 2)) == "FFSFSFSFSF"
    assert IndexPattern.uniform(47, 2).num_full == 24
    assert IndexPattern.uniform(47, 8).num_full == 7
    assert str(IndexPattern.uniform(12, 4, offset=3)) == "FFFSSSFSSSFS"  # GLM-5.2 IndexShare style
    assert str(IndexPattern.uniform(9, 4, offset=1)) == "FSSSFSSSF"
    assert str(IndexPattern.uniform(5, 1)) == "FFFFF"


def test_keep_fraction_is_uniform_with_reference_offset():
    assert IndexPattern.keep(47, "1/4") == IndexPattern.uniform(47, 4)
    assert IndexPattern.parse("1/2", 10) == IndexPattern.uniform(10, 2)
    assert IndexPattern.parse("keep 1/4", 47) == IndexPattern.uniform(47, 4)


def test_source_and_served_by():
    p = IndexPattern("FSSFFS")
    assert [p.source(i) for i in range(6)] == [0, 0, 0, 3, 4, 4]
    assert p.served_by(0) == [1, 2] and p.served_by(3) == [] and p.served_by(4) == [5]
    with pytest.raises(PatternError, match="layer 1 is shared"):
        p.served_by(1)
    text = p.describe()
    assert "3 of 6 layers run the indexer" in text and "F0 -> S 1-2" in text


def test_published_glm5_pattern_counts():
    s = "FFSFSSSFSSFFFSSSFFFSFSSSSSSFFSFFSFFSSFFFFFFSFFFFFSFFSSSSSSFSFFFSFSSSFSFFSFFSSS"
    p = IndexPattern(s, 78)
    assert p.num_full == 40 and len(p.shared_layers) == 38


def test_from_hf_config_keys_and_conflicts():
    assert str(IndexPattern.from_hf_config({"index_topk_pattern": "FSFS"}, 4)) == "FSFS"
    assert str(IndexPattern.from_hf_config({"indexer_types": ["full", "shared", "shared", "full"]}, 4)) == "FSSF"
    assert str(IndexPattern.from_hf_config({"index_topk_freq": 2}, 6)) == "FFSFSF"
    assert str(IndexPattern.from_hf_config({}, 3)) == "FFF"
    # transformers writes both keys, consistently: accepted
    assert str(IndexPattern.from_hf_config({"index_topk_pattern": "FSFS",
                                            "indexer_types": ["full", "shared", "full", "shared"]}, 4)) == "FSFS"
    with pytest.raises(PatternError, match="conflicting"):
        IndexPattern.from_hf_config({"index_topk_pattern": "FSFS", "index_topk_freq": 4}, 4)
    with pytest.raises(PatternError, match="conflicting"):
        IndexPattern.from_hf_config({"index_topk_pattern": "FSFS", "indexer_types": ["full"] * 4}, 4)


@pytest.mark.parametrize("make,match", [
    (lambda: IndexPattern("FSF", 4), "has 3 letters but the model has 4 layers"),
    (lambda: IndexPattern("FSXF"), "'X' at layer 2"),
    (lambda: IndexPattern("fsfs"), "'f' at layer 0"),
    (lambda: IndexPattern("SFFF"), "starts with 'S'"),
    (lambda: IndexPattern(""), "non-empty"),
    (lambda: IndexPattern.uniform(8, 0), "index_topk_freq must be an integer >= 1, got 0"),
    (lambda: IndexPattern.uniform(8, -2), "got -2"),
    (lambda: IndexPattern.uniform(8, 2, offset=-1), "index_skip_topk_offset"),
    (lambda: IndexPattern.keep(8, "2/3"), "'1/N'"),
    (lambda: IndexPattern.keep(8, "1/0"), "'1/N'"),
    (lambda: IndexPattern.from_indexer_types(["full", "half"]), "'half' at layer 1"),
    (lambda: IndexPattern.from_indexer_types("full"), "must be a list"),
    (lambda: IndexPattern.parse(3.5, 4), "cannot read an index pattern"),
    (lambda: IndexPattern.from_hf_config({"index_topk_freq": 0}, 4), "got 0"),
    (lambda: IndexPattern.parse("FRRR@", 4), "after '@' in 'FRRR@' must be a positive integer, got ''"),
    (lambda: IndexPattern.parse("FRRR@0", 4), "got '0'"),
    (lambda: IndexPattern.parse("FRRR@4k", 4), "got '4k'"),
])
def test_validation_errors_name_the_bad_value(make, match):
    with pytest.raises(PatternError, match=match):
        make()


def test_parse_reads_a_pool_after_at():
    p = IndexPattern.parse("FRRSFRRR@4096", 8)
    assert p == IndexPattern("FRRSFRRR", pool=4096) and p.pool == 4096 and str(p) == "FRRSFRRR"
    assert IndexPattern.parse("1/4@512", 8) == IndexPattern.keep(8, "1/4").with_pool(512)
    assert IndexPattern.parse("FRRR", 4).pool is None


def test_engine_flags_carry_the_pattern():
    p = IndexPattern("FFSSF")
    flags = p.engine_flags()
    assert '"index_topk_pattern": "FFSSF"' in flags["sglang"] and flags["sglang"].startswith("--json-model-override-args")
    assert flags["vllm"].startswith("--hf-overrides") and "FFSSF" in flags["vllm"]
    assert "index_topk_pattern = 'FFSSF'" in flags["transformers"]


def test_layer_plan_roles():
    from indexcache.pattern import LayerPlan, LayerRole

    plan = LayerPlan(IndexPattern("FFSSFS"))
    assert [r.source for r in plan] == [0, 1, 1, 1, 4, 4]
    assert [plan.runs_indexer(i) for i in range(6)] == [True, True, False, False, True, False]
    assert plan[3] == LayerRole(runs_indexer=False, source=1) and len(plan) == 6
    assert plan.num_full == 3 and plan.full_layers == [0, 1, 4] and str(plan) == "FFSSFS"
    assert plan == LayerPlan(IndexPattern("FFSSFS")) and plan != LayerPlan(IndexPattern("FFSSSS"))


def test_model_layer_plan_is_the_one_resolver():
    import torch

    from indexcache.checkpoint import build_empty
    from indexcache.presets import preset_config

    model = build_empty(preset_config("tiny").with_pattern("FSFSFSFS"), "meta", torch.float32)
    assert str(model.layer_plan()) == "FSFSFSFS"  # None: the pattern the model was built with
    assert str(model.layer_plan("FSSSFSSS")) == "FSSSFSSS"  # fewer indexers run
    with pytest.raises(PatternError, match="no indexer weights"):
        model.layer_plan("all")
