"""The sharding plan without processes: divisibility errors, vocabulary chunks, FP8 slices on block boundaries."""
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import indexcache
from indexcache.checkpoint import dequantize_fp8_blocks, quantize_fp8_blocks
from indexcache.distributed import ParallelContext, ParallelError, shard_model
from indexcache.distributed.loading import read_slice
from indexcache.distributed.plan import Shard, check_divisible, param_shard
from indexcache.presets import preset_config


def test_uneven_splits_are_named():
    cfg = preset_config("tiny")  # 4 heads, 8 experts
    with pytest.raises(ParallelError, match=r"num_attention_heads \(4\) is not divisible by .* 3"):
        check_divisible(cfg, ParallelContext(0, 3))
    glm_flash = preset_config("glm-4.7-flash-dsa")  # 20 heads
    with pytest.raises(ParallelError, match=r"num_attention_heads \(20\)"):
        check_divisible(glm_flash, ParallelContext(0, 8))
    check_divisible(glm_flash, ParallelContext(1, 4, expert_parallel=True))
    with pytest.raises(ParallelError, match="rank 2 is not in a world of 2"):
        ParallelContext(2, 2)


def test_vocabulary_chunks_cover_it_once():
    covered = []
    for r in range(3):
        a, b, per = ParallelContext(r, 3).padded_range(97)
        assert per == 33 and b - a <= per
        covered += range(a, b)
    assert covered == list(range(97))


def test_shapes_of_a_tp2_shard():
    cfg = preset_config("tiny")
    ctx = ParallelContext(1, 2)
    with torch.device("meta"):
        model = shard_model(indexcache.DSAModel(cfg), ctx)
    attn = model.layers[1].self_attn
    assert attn.num_local_heads == 2
    assert attn.q_b_proj.weight.shape == (2 * cfg.qk_head_dim, cfg.q_lora_rank)
    assert attn.o_proj.weight.shape == (cfg.hidden_size, 2 * cfg.v_head_dim)
    assert attn.q_a_proj.weight.shape == (cfg.q_lora_rank, cfg.hidden_size)  # replicated
    assert model.layers[1].mlp.experts.gate_up.shape == (8, cfg.moe_intermediate_size, cfg.hidden_size)
    assert model.embed_tokens.weight.shape == (cfg.vocab_size // 2, cfg.hidden_size)
    with torch.device("meta"):
        ep = shard_model(indexcache.DSAModel(cfg), ParallelContext(1, 2, expert_parallel=True))
    assert ep.layers[1].mlp.experts.gate_up.shape == (4, 2 * cfg.moe_intermediate_size, cfg.hidden_size)
    assert ep.layers[1].mlp.experts.first == 4
    assert param_shard("layers.1.mlp.experts.gate_up", cfg, ParallelContext(1, 2)) == Shard(1, ((32, 64), (96, 128)))


def _fp8_file(tmp_path, shape):
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    q, s = quantize_fp8_blocks(w)
    path = str(tmp_path / "w.safetensors")
    save_file({"w": q, "w_scale_inv": s}, path)
    return path, dequantize_fp8_blocks(q, s)


@pytest.mark.parametrize("dim", [0, 1])
def test_fp8_slices_read_whole_blocks(tmp_path, dim):
    path, full = _fp8_file(tmp_path, (256, 320))  # 320 columns: the last block is 64 wide
    h = safe_open(path, framework="pt")
    ranges = ((128, 256),) if dim == 0 else ((0, 128), (256, 320))
    got, scales, nbytes = read_slice(h, "w", Shard(dim, ranges), "w_scale_inv", ParallelContext(1, 2))
    want = torch.cat([full.narrow(dim, a, b - a) for a, b in ranges], dim)
    assert scales is None and torch.equal(got, want)
    assert nbytes == want.numel() + 4 * (3 if dim == 0 else 2 * 2)  # fp8 bytes + the scales' fp32 rows/columns
    # kept FP8: the stored blocks and their scales, as they are
    raw, scales, _ = read_slice(h, "w", Shard(dim, ranges), "w_scale_inv", ParallelContext(1, 2), dequantize=False)
    assert raw.dtype == torch.float8_e4m3fn and torch.equal(dequantize_fp8_blocks(raw, scales), want)


def test_fp8_slice_off_a_block_boundary_is_an_error(tmp_path):
    path, _ = _fp8_file(tmp_path, (256, 384))
    h = safe_open(path, framework="pt")
    with pytest.raises(ParallelError, match=r"w: rank 1's slice \[192, 384\) of dim 1 .* 128-wide FP8 block"):
        read_slice(h, "w", Shard(1, ((192, 384),)), "w_scale_inv", ParallelContext(1, 2))


def test_communication_bytes_of_the_plan():
    from indexcache.distributed.plan import communication_bytes_per_token

    cfg = preset_config("deepseek-v3.2")  # 61 layers, hidden 7168, top-k 2048, vocab 129280
    c = communication_bytes_per_token(cfg, 8, num_full=16)
    assert c["allreduce_payload"] == (1 + 2 * 61) * 7168 * 2
    assert c["allreduce_ring_per_rank"] == (1 + 2 * 61) * 7168 * 2 * 2 * 7 // 8
    assert c["indexer_gather_per_rank"] == 16 * 2048 * 4 * 7 // 8
    assert c["logits_gather_per_rank"] == 16160 * 7 * 2


def test_random_shards_share_the_replicated_weights():
    import numpy as np

    from .spawn import run_ranks
    from .workers import random_shard_replicas

    cfg = preset_config("tiny")
    a, b = run_ranks(random_shard_replicas)
    for name in a:
        same = np.array_equal(a[name], b[name])
        assert same == (param_shard(name, cfg, ParallelContext(0, 2)) is None), name


def test_strided_rows_cover_every_row_once():
    from indexcache.distributed.comm import strided_rows

    for n in (1, 5, 8, 29):
        rows = [strided_rows(n, ParallelContext(r, 3)).tolist() for r in range(3)]
        per = -(-n // 3)
        assert all(len(x) == per for x in rows)
        # row j*3 + r of the whole is rank r's j-th row (padding repeats row n-1 and is dropped on gathering)
        flat = [rows[r][j] for j in range(per) for r in range(3)][:n]
        assert flat == list(range(n))
