"""The MoE router kernel (interpreter on CPU) against its PyTorch reference: fresh random inputs, ragged token
counts (decode-sized with D splits, prefill-sized with several token blocks), both routings (no groups, and
DeepSeek-V3.2's 8 groups keeping 4), norm on and off, exact ties, poisoned outputs, the arrival counters back at
zero and the same bits on a second call; ``route`` against ``Router.forward``; the GPU at real sizes."""
import pytest
import torch

from indexcache.config import ModelConfig
from indexcache.kernels._dispatch import interpreting
from indexcache.kernels.arrival import _COUNTERS
from indexcache.kernels.router import route, router_reference, router_topk
from indexcache.model.moe import Router
from indexcache.presets import preset_hf_dict

needs_kernel = pytest.mark.skipif(not interpreting() and not torch.cuda.is_available(),
                                  reason="needs the Triton interpreter or CUDA")

GLM = dict(e=64, k=4, n_group=1, topk_group=1, scale=1.8)       # glm-4.7-flash's routing
DSV = dict(e=256, k=8, n_group=8, topk_group=4, scale=2.5)      # DeepSeek-V3.2's


def _inputs(n, e, d, dtype, seed, device, wdtype=None):
    g = torch.Generator(device).manual_seed(seed)
    x = torch.randn(n, d, generator=g, device=device).to(dtype)
    w = (torch.randn(e, d, generator=g, device=device) / d ** 0.5).to(wdtype or dtype)
    bias = torch.randn(e, generator=g, device=device) * 0.05
    return x, w, bias


def _choice(x, w, bias, n_group, topk_group):
    """The reference's masked choice values [N, E] (fp32) and each token's margin: the smaller of the gaps at the
    top-k group boundary and (filled in by the caller) at the top-k expert boundary."""
    scores = (x.float() @ w.float().t()).sigmoid()
    choice = scores + bias.float()
    n, e = choice.shape
    margin = torch.full((n,), float("inf"), device=x.device)
    if n_group > 1:
        gs = choice.view(n, n_group, -1).topk(2, dim=-1).values.sum(-1)
        top = gs.topk(min(topk_group + 1, n_group), dim=-1).values
        if topk_group < n_group:
            margin = top[:, topk_group - 1] - top[:, topk_group]
        keep = torch.zeros_like(gs, dtype=torch.bool).scatter_(1, gs.topk(topk_group, dim=-1).indices, True)
        choice = choice.masked_fill(~keep.repeat_interleave(e // n_group, dim=1), float("-inf"))
    return scores, choice, margin


def _assert_routing_matches(x, w, bias, got, want, k, n_group, topk_group, *, tol=1e-5):
    """Id sets equal per token (except tokens within ``tol`` of a boundary, where the reference's choice values of
    the selected experts must agree instead), ids in descending choice order, and each selected expert's weight
    equal up to fp32 summation order."""
    (ids, wts), (rid, rwt) = got, want
    assert ids.dtype == torch.int64 and wts.dtype == torch.float32 and ids.shape == rid.shape == wts.shape
    assert not wts.isnan().any() and ((ids >= 0) & (ids < w.shape[0])).all()
    _, choice, margin = _choice(x, w, bias, n_group, topk_group)
    top = choice.topk(min(k + 1, choice.shape[1]), dim=-1).values
    if k < choice.shape[1]:
        margin = torch.minimum(margin, top[:, k - 1] - top[:, k])
    clear = margin > tol
    got_set, want_set = ids.sort(1).values, rid.sort(1).values
    assert torch.equal(got_set[clear], want_set[clear])
    got_c, want_c = choice.gather(1, ids), choice.gather(1, rid)
    torch.testing.assert_close(got_c.sort(1).values, want_c.sort(1).values, rtol=0, atol=2 * tol)
    assert (got_c[:, :-1] >= got_c[:, 1:] - 2 * tol).all()  # descending choice
    go, wo = ids.argsort(1), rid.argsort(1)
    same = clear[:, None].expand_as(wts)
    torch.testing.assert_close(wts.gather(1, go)[same], rwt.gather(1, wo)[same], rtol=1e-5, atol=1e-6)


def _poison_empty(monkeypatch):
    real_empty = torch.empty

    def poisoned(*shape, dtype=None, device=None, **kw):  # every output and scratch starts as garbage
        t = real_empty(*shape, dtype=dtype, device=device, **kw)
        return t.fill_(float("nan") if t.is_floating_point() else -7)

    monkeypatch.setattr(torch, "empty", poisoned)


def _counters_zero(device):
    buf = _COUNTERS.get(torch.device(device))
    return buf is None or not buf.any()


@needs_kernel
@pytest.mark.parametrize("n,routing,dtype,norm", [
    (1, GLM, torch.float32, True), (7, GLM, torch.float16, False), (33, GLM, torch.float32, True),
    (300, GLM, torch.float16, True), (1, DSV, torch.float16, True), (7, DSV, torch.float32, True),
    (33, DSV, torch.float32, False), (150, DSV, torch.float32, True),
], ids=lambda v: v if not isinstance(v, dict) else f"E{v['e']}g{v['n_group']}")
def test_kernel_matches_reference(n, routing, dtype, norm, device, monkeypatch):
    r = routing
    x, w, bias = _inputs(n, r["e"], 96, dtype, seed=n + r["e"], device=device)  # 96: a masked D tail
    kw = dict(n_group=r["n_group"], topk_group=r["topk_group"], norm=norm, scale=r["scale"])
    want = router_reference(x, w, bias, r["k"], **kw)
    _poison_empty(monkeypatch)
    got = router_topk(x, w, bias, r["k"], **kw)
    again = router_topk(x, w, bias, r["k"], **kw)
    monkeypatch.undo()
    _assert_routing_matches(x, w, bias, got, want, r["k"], r["n_group"], r["topk_group"])
    assert torch.equal(got[0], again[0]) and torch.equal(got[1], again[1])
    assert _counters_zero(device)


@needs_kernel
@pytest.mark.parametrize("n,e,k,block_t,block_e,splits,dtype,exact", [
    (5, 48, 6, 16, 16, 3, torch.float32, False),   # experts not a power of two, three D splits (the last short)
    (40, 16, 1, 16, 16, 2, torch.float16, False),  # several token blocks with splits; top-1
    (20, 64, 4, 32, 32, 1, torch.float16, True),   # two expert blocks meet on one counter; fp32 FMA products
])
def test_kernel_plans(n, e, k, block_t, block_e, splits, dtype, exact, device, monkeypatch):
    from indexcache.kernels.router.triton import router_triton

    x, w, bias = _inputs(n, e, 160, dtype, seed=e * k + n, device=device)
    want = router_reference(x, w, bias, k, norm=True, scale=1.3)
    _poison_empty(monkeypatch)
    got = router_triton(x, w, bias, k, 1, 1, True, 1.3, block_t=block_t, block_e=block_e, block_d=32, splits=splits,
                        exact_products=exact)
    monkeypatch.undo()
    _assert_routing_matches(x, w, bias, got, want, k, 1, 1)
    assert _counters_zero(device)


@needs_kernel
@pytest.mark.parametrize("routing", [GLM, DSV], ids=["E64", "E256g8"])
def test_ties(routing, device):
    """Integer logits: many experts share a choice value exactly. The selected choice values equal the
    reference's; without groups the ids are the lowest-index experts among ties, in descending choice."""
    r = routing
    g = torch.Generator(device).manual_seed(3)
    n, d = 24, 16
    x = torch.randint(-1, 2, (n, d), generator=g, device=device).float()
    w = torch.randint(-1, 2, (r["e"], d), generator=g, device=device).float()
    # one bias per group: ties within groups, none between groups' scores
    bias = (torch.arange(r["e"], device=device) // (r["e"] // r["n_group"])).float() * 1e-3
    kw = dict(n_group=r["n_group"], topk_group=r["topk_group"], norm=True, scale=r["scale"])
    ids, wts = router_topk(x, w, bias, r["k"], **kw)
    rid, rwt = router_reference(x, w, bias, r["k"], **kw)
    scores, choice, _ = _choice(x, w, bias, r["n_group"], r["topk_group"])
    ties = (choice.gather(1, rid)[:, :, None] == choice[:, None, :]).sum(-1) > 1
    assert ties.any()  # the case is real: selected experts tie with others
    assert torch.equal(choice.gather(1, ids).sort(1).values, choice.gather(1, rid).sort(1).values)
    torch.testing.assert_close(wts.sort(1).values, rwt.sort(1).values, rtol=1e-5, atol=1e-6)
    if r["n_group"] == 1:
        order = torch.sort(-choice, dim=1, stable=True).indices[:, :r["k"]]  # lower index first among ties
        assert torch.equal(ids, order)


@needs_kernel
@pytest.mark.parametrize("n_group,topk_group,experts,k", [(1, 1, 8, 2), (4, 2, 64, 4)])
def test_route_matches_router_forward(n_group, topk_group, experts, k, device):
    hf = preset_hf_dict("tiny") | dict(n_group=n_group, topk_group=topk_group, n_routed_experts=experts,
                                       num_experts_per_tok=k, norm_topk_prob=n_group > 1)
    router = Router(ModelConfig.from_hf_dict(hf, name="tiny")).to(device)
    torch.manual_seed(5)
    with torch.no_grad():
        router.weight.normal_(0, 0.1)
        router.e_score_correction_bias.normal_(0, 0.05)
    x = torch.randn(9, router.weight.shape[1], device=device)
    got = route(x, router)
    want = router.torch_forward(x)
    _assert_routing_matches(x, router.weight, router.e_score_correction_bias, got, want, k, n_group, topk_group)


def test_checks():
    x, w, b = torch.randn(3, 8), torch.randn(16, 8), torch.zeros(16)
    with pytest.raises(ValueError, match=r"x must be float32/float16/bfloat16 \[N, D\]"):
        router_topk(x[0], w, b, 2)
    with pytest.raises(ValueError, match=r"weight must be .* \[E, D=8\], got \(16, 4\)"):
        router_topk(x, w[:, :4], b, 2)
    with pytest.raises(ValueError, match=r"bias must be a float tensor \[E=16\], got \(8,\)"):
        router_topk(x, w, b[:8], 2)
    with pytest.raises(ValueError, match="n_group must divide the 16 experts, got 3"):
        router_topk(x, w, b, 2, n_group=3)
    with pytest.raises(ValueError, match=r"topk_group must be in \[1, n_group=4\], got 5"):
        router_topk(x, w, b, 2, n_group=4, topk_group=5)
    with pytest.raises(ValueError, match=r"top_k must be in \[1, 8\] .* got 9"):
        router_topk(x, w, b, 9, n_group=4, topk_group=2)


@needs_kernel
def test_traced_by_torch_compile_as_one_op(device):
    """A custom op with a fake implementation: torch.compile traces through it without a graph break."""
    x, w, bias = _inputs(5, 32, 48, torch.float32, seed=11, device=device)
    kw = dict(n_group=4, topk_group=2, norm=True, scale=2.0)
    compiled = torch.compile(lambda t: router_topk(t, w, bias, 3, **kw), backend="aot_eager", fullgraph=True)
    got = compiled(x)
    _assert_routing_matches(x, w, bias, got, router_reference(x, w, bias, 3, **kw), 3, 4, 2)


@pytest.mark.gpu
@pytest.mark.parametrize("n", [1, 8, 8192])
@pytest.mark.parametrize("wdtype", [torch.bfloat16, torch.float32])
def test_gpu_glm_sizes(n, wdtype):
    r = GLM
    x, w, bias = _inputs(n, r["e"], 2048, torch.bfloat16, seed=n, device="cuda", wdtype=wdtype)
    kw = dict(n_group=1, topk_group=1, norm=True, scale=r["scale"])
    got = router_topk(x, w, bias, r["k"], **kw)
    _assert_routing_matches(x, w, bias, got, router_reference(x, w, bias, r["k"], **kw), r["k"], 1, 1, tol=1e-5)
    assert _counters_zero("cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("n", [8, 8192])
def test_gpu_exact_products(n):
    from indexcache.kernels.router.triton import router_triton

    r = GLM
    x, w, bias = _inputs(n, r["e"], 2048, torch.bfloat16, seed=n + 1, device="cuda")
    got = router_triton(x, w, bias, r["k"], 1, 1, True, r["scale"], exact_products=True)
    want = router_reference(x, w, bias, r["k"], norm=True, scale=r["scale"])
    _assert_routing_matches(x, w, bias, got, want, r["k"], 1, 1)


@pytest.mark.gpu
@pytest.mark.parametrize("n", [1, 16, 2048])
def test_gpu_deepseek_sizes(n):
    r = DSV
    x, w, bias = _inputs(n, r["e"], 7168, torch.bfloat16, seed=n, device="cuda")
    kw = dict(n_group=8, topk_group=4, norm=True, scale=r["scale"])
    got = router_topk(x, w, bias, r["k"], **kw)
    _assert_routing_matches(x, w, bias, got, router_reference(x, w, bias, r["k"], **kw), r["k"], 8, 4, tol=1e-5)


@pytest.mark.gpu
def test_gpu_cuda_graph_replay():
    r = GLM
    x, w, bias = _inputs(4, r["e"], 2048, torch.bfloat16, seed=1, device="cuda")
    kw = dict(n_group=1, topk_group=1, norm=True, scale=r["scale"])
    router_topk(x, w, bias, r["k"], **kw)  # warm-up: compiles, allocates the counters
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        ids, wts = router_topk(x, w, bias, r["k"], **kw)
    for seed in (2, 3):
        x.copy_(_inputs(4, r["e"], 2048, torch.bfloat16, seed=seed, device="cuda")[0])
        g.replay()
        torch.cuda.synchronize()
        _assert_routing_matches(x, w, bias, (ids.clone(), wts.clone()), router_reference(x, w, bias, r["k"], **kw),
                                r["k"], 1, 1)
    assert _counters_zero("cuda")
