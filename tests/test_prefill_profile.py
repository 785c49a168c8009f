"""benchmarks/prefill_profile.py runs end to end on the CPU (tiny model): the last chunk of a prompt over a
random-filled cache, through the engine's runner, for a full and an IndexCache pattern."""
import json
import os

import torch

from benchmarks.prefill_profile import family, main


def test_kernel_families():
    assert family("_grouped_fp8_swiglu_kernel") == "moe_experts"
    assert family("_sparse_mla_prefill_kernel") == "sparse_mla"
    assert family("nvjet_hsh_128x256_64x4_2x1_v_bz_TNN") == "gemm"
    assert family("void at::native::elementwise_kernel<...>") == "copy_elementwise"


def test_runs_on_cpu(tmp_path, monkeypatch):
    monkeypatch.setenv("OUT", str(tmp_path))
    torch.manual_seed(0)
    assert main(["--device", "cpu", "--model", "tiny", "--layers", "2", "--context", "384", "--chunk", "128",
                 "--patterns", "full,1/2", "--steps", "1", "--ops", "5"]) == 0
    res = json.load(open(os.path.join(tmp_path, "prefill_profile.json")))
    assert [c["pattern"] for c in res["cases"]] == ["full", "1/2"]
    assert all(c["chunk"] == 128 and c["chunk_ms"] > 0 for c in res["cases"])
    ops = res["cases"][0]["ops"]  # --ops: aten ops with their input shapes, most expensive first
    assert 0 < len(ops) <= 5 and all(r["op"].startswith("aten::") and r["calls_per_step"] > 0 for r in ops)
    assert ops == sorted(ops, key=lambda r: -r["us_per_step"])


def test_context_past_the_models_positions(tmp_path, monkeypatch):
    """--max-position-embeddings reaches the model (as in benchmarks.e2e), so a context past the preset's own
    limit is profiled instead of refused by the engine."""
    from indexcache.presets import preset_config

    limit = preset_config("tiny").max_position_embeddings
    monkeypatch.setenv("OUT", str(tmp_path))
    assert main(["--device", "cpu", "--model", "tiny", "--layers", "1", "--context", str(limit + 256),
                 "--chunk", "128", "--patterns", "full", "--steps", "1",
                 "--max-position-embeddings", str(limit + 1024)]) == 0
    res = json.load(open(os.path.join(tmp_path, "prefill_profile.json")))
    assert res["cases"][0]["context"] == limit + 256
