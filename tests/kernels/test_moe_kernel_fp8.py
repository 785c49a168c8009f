"""Small-batch MoE experts on FP8 weights with 128x128 block scales: Triton (interpreter on CPU, fp32
activations) against the reference, and the FP8 reference against the dequantised-weights reference."""
import pytest
import torch

from indexcache.kernels._dispatch import interpreting
from indexcache.kernels.fp8_linear import dequantize_weight, quantize_weight
from indexcache.kernels.moe import moe_experts_small, moe_experts_small_reference


def _fp8_inputs(n, k, e, d, inter, *, seed=0, device="cpu", dtype=torch.float32):
    g = torch.Generator(device).manual_seed(seed)
    x = torch.randn(n, d, generator=g, device=device).to(dtype)
    gu_s, dn_s, gu_q, dn_q = [], [], [], []
    for _ in range(e):
        # column magnitudes vary, so neighbouring 128-blocks get different scales
        col = torch.rand(1, d, generator=g, device=device) + 0.05
        (g8, gs), (u8, us) = [quantize_weight(torch.randn(inter, d, generator=g, device=device) * col / d ** 0.5)
                              for _ in range(2)]
        gu_q.append(torch.cat([g8, u8]))
        gu_s.append(torch.cat([gs, us]))
        d8, dsc = quantize_weight(torch.randn(d, inter, generator=g, device=device) / inter ** 0.5)
        dn_q.append(d8)
        dn_s.append(dsc)
    ids = torch.randint(0, e - 1, (n, k), generator=g, device=device)  # the last expert gets no token
    if k > 1:
        ids[0, 1] = ids[0, 0]
    weights = torch.rand(n, k, generator=g, device=device) + 0.1
    return x, ids, weights, torch.stack(gu_q), torch.stack(gu_s), torch.stack(dn_q), torch.stack(dn_s)


def test_fp8_reference_equals_dequantised_reference():
    x, ids, w, gq, gs, dq, ds = _fp8_inputs(3, 2, 4, 300, 150, seed=1)
    inter, ib = 150, 2
    gu = torch.stack([torch.cat([dequantize_weight(gq[e, :inter], gs[e, :ib]),
                                 dequantize_weight(gq[e, inter:], gs[e, ib:])]) for e in range(4)])
    dn = torch.stack([dequantize_weight(dq[e], ds[e]) for e in range(4)])
    torch.testing.assert_close(moe_experts_small_reference(x, ids, w, gq, dq, gs, ds),
                               moe_experts_small_reference(x, ids, w, gu, dn), rtol=1e-6, atol=1e-6)


# (n, k, e, d, inter, blocks): I and D not multiples of 128 (gate/up and row blocks with partial tails), several
# loop iterations, row blocks smaller than 128
CASES = [
    (1, 4, 5, 300, 150, (32, 64, 32, 64)),
    (2, 2, 4, 256, 256, (64, 128, 64, 128)),
    (5, 1, 3, 200, 72, None),
]


@pytest.mark.skipif(not interpreting() and not torch.cuda.is_available(), reason="needs the Triton interpreter or CUDA")
@pytest.mark.parametrize("n,k,e,d,inter,blocks", CASES)
def test_fp8_triton_matches_reference(n, k, e, d, inter, blocks, device):
    from indexcache.kernels.moe.triton import moe_experts_small_triton

    x, ids, w, gq, gs, dq, ds = _fp8_inputs(n, k, e, d, inter, seed=n + d, device=device)
    want = moe_experts_small_reference(x, ids, w, gq, dq, gs, ds)
    act = torch.full((n * k, inter), float("nan"), device=device)
    part = torch.full((n * k, d), float("nan"), device=device)
    kw = dict(zip(("block_i", "block_d", "block_d2", "block_i2"), blocks)) if blocks else {}
    got = moe_experts_small_triton(x, ids, w, gq, dq, gate_up_scale=gs, down_scale=ds, act=act, part=part, **kw)
    assert not act.isnan().any() and not part.isnan().any()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # the K-sum happens in the down kernel's last program per (token, row block): same bits on a second call,
    # whichever program arrives last, and the arrival counters are back at zero
    from indexcache.kernels.arrival import arrival_counters

    again = moe_experts_small_triton(x, ids, w, gq, dq, gate_up_scale=gs, down_scale=ds, **kw)
    assert torch.equal(again, got) and not arrival_counters(x.device, 1).any()


def test_fp8_checks():
    x, ids, w, gq, gs, dq, ds = _fp8_inputs(2, 2, 3, 128, 128)
    with pytest.raises(ValueError, match="FP8 experts need gate_up_scale"):
        moe_experts_small(x, ids, w, gq, dq)
    with pytest.raises(ValueError, match="FP8 experts need gate_up_scale"):
        moe_experts_small(x, ids, w, gq, dq, gs[:, :1], ds)
    with pytest.raises(ValueError, match="block scales are for FP8 experts"):
        moe_experts_small(x, ids, w, gq.float(), dq.float(), gs, ds)


@pytest.mark.gpu
def test_fp8_triton_bf16_on_gpu():
    x, ids, w, gq, gs, dq, ds = _fp8_inputs(4, 4, 64, 2048, 1536, seed=7, device="cuda", dtype=torch.bfloat16)
    got = moe_experts_small(x, ids, w, gq, dq, gs, ds).float()
    want = moe_experts_small_reference(x, ids, w, gq, dq, gs, ds).float()
    assert float((got - want).norm() / want.norm()) < 4e-3  # fp32 accumulation, bf16 output rounding
