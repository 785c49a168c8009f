"""TrainConfig's initialisation: MLP output projections can start at zero without changing any other weight."""
import dataclasses

import torch

from indexcache.checkpoint import build_empty
from indexcache.tools.train import PRESETS, TrainConfig


def _model(tc: TrainConfig, moe: bool = False):
    cfg = tc.model_config()
    if moe:  # one MoE layer too: routed and shared experts have output projections of their own
        cfg = dataclasses.replace(cfg, mlp_layer_types=("dense",) * (cfg.num_layers - 1) + ("sparse",))
    return tc.init_weights(build_empty(cfg, "cpu", torch.float32))


def test_mlp_out_std_zero_starts_mlps_at_zero_and_keeps_other_draws():
    base = TrainConfig(layers=2, init_std=0.05)
    ref = dict(_model(base, moe=True).named_parameters())
    zero = dict(_model(dataclasses.replace(base, init_mlp_out_std=0.0), moe=True).named_parameters())
    outs = {n for n in ref if n.endswith("mlp.down_proj.weight") or n.endswith("shared_experts.down_proj.weight")
            or n.endswith("experts.down")}
    assert len(outs) == 3  # dense MLP, shared experts, routed experts
    for n, p in zero.items():
        if n in outs:
            assert ref[n].abs().max() > 0 and p.abs().max() == 0, n
        else:
            assert torch.equal(p, ref[n]), n
    h = torch.randn(3, 5, base.hidden)
    model = _model(dataclasses.replace(base, init_mlp_out_std=0.0))
    assert model.layers[0].mlp(h).abs().max() == 0


def test_mlp_out_std_scales_the_same_draws():
    base = TrainConfig(layers=2, init_std=0.05)
    a = _model(base).layers[1].mlp.down_proj.weight
    b = _model(dataclasses.replace(base, init_mlp_out_std=0.01)).layers[1].mlp.down_proj.weight
    torch.testing.assert_close(b, a * 0.2)


def test_retrieval_preset_starts_mlps_at_zero():
    assert PRESETS["retrieval"].init_mlp_out_std == 0.0
