"""MoE routing helpers."""
import pytest
import torch

from indexcache.model.moe import expert_order


@pytest.mark.parametrize("m,e", [(1, 64), (4, 64), (37, 8), (1000, 64), (5000, 64), (3, 3)])
def test_expert_order_is_the_stable_argsort(m, e):
    flat = torch.randint(0, e, (m,), generator=torch.Generator().manual_seed(m + e))
    assert torch.equal(expert_order(flat, e), flat.argsort(stable=True))


@pytest.mark.gpu
@pytest.mark.parametrize("inter", [256, 192])
def test_fp8_expert_prefill_paths_agree_on_gpu(inter):
    """The FP8 prefill path (W8A8 grouped GEMM) against fp32 experts on the same dequantised weights, within
    FP8-activation error. inter=192: gate's and up's scale blocks restart at row I (two GEMMs)."""
    import torch.nn.functional as F

    from types import SimpleNamespace

    from indexcache.model.moe import Experts, fp8_experts_w8a8

    E, D = 8, 256
    cfg = SimpleNamespace(n_routed_experts=E, hidden_size=D, moe_intermediate_size=inter)
    ex = Experts(cfg).to("cuda")
    g = torch.Generator("cuda").manual_seed(inter)
    with torch.no_grad():
        ex.gate_up.copy_(torch.randn(ex.gate_up.shape, generator=g, device="cuda") / D ** 0.5)
        ex.down.copy_(torch.randn(ex.down.shape, generator=g, device="cuda") / inter ** 0.5)
    ex.use_fp8_storage(quantize=True)
    gu, dn = ex.dequantized(torch.float32)
    counts = torch.tensor([30, 0, 5, 100, 1, 0, 64, 7], dtype=torch.int32, device="cuda")
    xs = torch.randn(int(counts.sum()), D, generator=g, device="cuda").to(torch.bfloat16)
    rows = torch.repeat_interleave(torch.arange(E, device="cuda"), counts.long())
    want = torch.stack([F.linear(F.silu(h[:inter]) * h[inter:], dn[e]) for h, e in
                        zip(torch.einsum("md,mnd->mn", xs.float(), gu[rows]), rows.tolist())])
    for fn, tol in ((fp8_experts_w8a8, 0.08),):
        got = fn(ex, xs, counts).float()
        err = float((got - want).norm() / want.norm())
        assert err < tol, (fn.__name__, err)
