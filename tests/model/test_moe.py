"""MoE routing helpers."""
import pytest
import torch

from indexcache.model.moe import combine_experts, expert_order


@pytest.mark.parametrize("m,e", [(1, 64), (4, 64), (37, 8), (1000, 64), (5000, 64), (3, 3)])
def test_expert_order_is_the_stable_argsort(m, e):
    flat = torch.randint(0, e, (m,), generator=torch.Generator().manual_seed(m + e))
    assert torch.equal(expert_order(flat, e), flat.argsort(stable=True))


@pytest.mark.parametrize("n,k", [(1, 4), (7, 8), (33, 2)])
def test_combine_experts_sums_each_token_once_in_fp32(n, k):
    """Every (token, slot) row lands on its token with its weight, summed in fp32 and rounded once to bf16: the
    result is the fp64 sum rounded to bf16 (a bf16 index_add_ rounds after each of the K adds), and a token's
    output is the same bits whether it is combined alone or in a batch."""
    g = torch.Generator().manual_seed(n * 10 + k)
    D = 96
    ids = torch.randint(0, 16, (n, k), generator=g)
    order = expert_order(ids.flatten(), 16)
    ys = (torch.randn(n * k, D, generator=g) * 3).to(torch.bfloat16)           # rows in expert order
    w = torch.rand(n, k, generator=g) + 0.1
    out = combine_experts(ys, order, w)
    assert out.dtype == torch.bfloat16 and out.shape == (n, D)
    want = torch.zeros(n, D, dtype=torch.float64)
    for p, pair in enumerate(order.tolist()):
        want[pair // k] += ys[p].double() * w[pair // k, pair % k].double()
    assert (out.double() - want.to(torch.bfloat16).double()).abs().max() <= want.abs().max() * 2 ** -20
    t = n // 2  # the same token alone: its k rows, in its own expert order
    sub = expert_order(ids[t:t + 1].flatten(), 16)
    inv = torch.empty_like(order)
    inv[order] = torch.arange(order.numel())
    alone = combine_experts(ys[inv[t * k + sub]], sub, w[t:t + 1])
    assert torch.equal(alone[0], out[t])


@pytest.mark.parametrize("inter", [256, 192])
def test_fp8_expert_prefill_path_agrees_with_fp32_experts(inter, device):
    """The FP8 prefill path (fused gate/up + SwiGLU grouped GEMM, weighted down GEMM in pair order, fixed-order
    sum) against fp32 experts on the same dequantised weights, within FP8-activation error. inter=192: up's
    scale blocks restart at row I, the last 128-column block is partial. Tokens repeat experts; one expert gets
    no token. CPU runs the references, the GPU the Triton kernels."""
    import torch.nn.functional as F

    from types import SimpleNamespace

    from indexcache.model.moe import Experts, fp8_experts_w8a8

    E, D, N, K = 8, 256, 40, 3
    ex = Experts(SimpleNamespace(n_routed_experts=E, hidden_size=D, moe_intermediate_size=inter)).to(device)
    g = torch.Generator(device).manual_seed(inter)
    with torch.no_grad():
        ex.gate_up.copy_(torch.randn(ex.gate_up.shape, generator=g, device=device) / D ** 0.5)
        ex.down.copy_(torch.randn(ex.down.shape, generator=g, device=device) / inter ** 0.5)
    ex.use_fp8_storage(quantize=True)
    gu, dn = ex.dequantized(torch.float32)
    x = torch.randn(N, D, generator=g, device=device).to(torch.bfloat16)
    ids = torch.stack([torch.randperm(E - 1, generator=g, device=device)[:K] for _ in range(N)])  # expert 7: none
    w = torch.rand(N, K, generator=g, device=device) + 0.1
    want = torch.zeros(N, D, device=device)
    for t in range(N):
        for j in range(K):
            h = gu[ids[t, j]] @ x[t].float()
            want[t] += w[t, j] * (dn[ids[t, j]] @ (F.silu(h[:inter]) * h[inter:]))
    got = fp8_experts_w8a8(ex, x, ids, w)
    assert got.dtype == torch.bfloat16 and got.shape == (N, D)
    err = float((got.float() - want).norm() / want.norm())
    assert err < 0.08, err
    assert torch.equal(got, fp8_experts_w8a8(ex, x, ids, w))


@pytest.mark.gpu
@pytest.mark.parametrize("fp8", [False, True])
def test_experts_on_gpu_give_the_same_bits_twice(fp8):
    """The prefill expert paths (grouped GEMM, FP8 W8A8) on a batch where many tokens share experts: two calls
    give identical bits (the combine has no atomics)."""
    from types import SimpleNamespace

    from indexcache.model.moe import Experts

    E, D, inter, N, K = 16, 256, 256, 2048, 4
    ex = Experts(SimpleNamespace(n_routed_experts=E, hidden_size=D, moe_intermediate_size=inter)).to("cuda")
    g = torch.Generator("cuda").manual_seed(1)
    with torch.no_grad():
        ex.gate_up.copy_(torch.randn(ex.gate_up.shape, generator=g, device="cuda") / D ** 0.5)
        ex.down.copy_(torch.randn(ex.down.shape, generator=g, device="cuda") / inter ** 0.5)
    ex = ex.to(torch.bfloat16)
    if fp8:
        ex.use_fp8_storage(quantize=True)
    x = torch.randn(N, D, generator=g, device="cuda").to(torch.bfloat16)
    ids = torch.randint(0, E, (N, K), generator=g, device="cuda")
    w = torch.rand(N, K, generator=g, device="cuda")
    with torch.no_grad():
        a, b = ex(x, ids, w), ex(x, ids, w)
    assert torch.isfinite(a).all() and a.abs().max() > 0
    assert torch.equal(a, b)
