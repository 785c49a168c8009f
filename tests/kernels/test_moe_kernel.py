"""Small-batch MoE experts: Triton (interpreter on CPU, fp32 inputs) vs the PyTorch reference, and the reference
vs the model's ``Experts`` module."""
import pytest
import torch
import torch.nn.functional as F

from indexcache.kernels._dispatch import interpreting
from indexcache.kernels.moe import SMALL_MAX_ROWS, moe_experts_small, moe_experts_small_reference


def _inputs(n, k, e, d, inter, *, seed=0, dtype=torch.float32, device="cpu", ids_dtype=torch.int64):
    g = torch.Generator(device).manual_seed(seed)  # generated where used: the GPU test's weights are 600 MB
    x = torch.randn(n, d, generator=g, device=device)
    gate_up = torch.randn(e, 2 * inter, d, generator=g, device=device) / d ** 0.5
    down = torch.randn(e, d, inter, generator=g, device=device) / inter ** 0.5
    ids = torch.randint(0, e, (n, k), generator=g, device=device)
    if n * k > 1:
        ids.view(-1)[-1] = ids.view(-1)[0]  # the same expert twice (within a row when n == 1, else across rows)
    if k > 1:
        ids[0, 1] = ids[0, 0]               # ... and twice within the first row
    weights = torch.rand(n, k, generator=g, device=device) + 0.1
    return x.to(dtype), ids.to(ids_dtype), weights, gate_up.to(dtype), down.to(dtype)


def _act_ref(x, ids, gate_up):
    inter = gate_up.shape[1] // 2
    k = ids.shape[1]
    h = torch.einsum("mjd,md->mj", gate_up[ids.reshape(-1).long()].float(), x.float().repeat_interleave(k, 0))
    return F.silu(h[:, :inter]) * h[:, inter:]


# (n, k, e, d, inter, blocks); blocks (block_i, block_d, block_d2, block_i2) small enough for ragged tails and
# several loop iterations on these small shapes; None = the GPU defaults (one iteration here).
CASES = [
    (1, 1, 5, 100, 36, (16, 32, 16, 16)),
    (1, 4, 5, 100, 36, (16, 32, 16, 16)),
    (3, 2, 5, 100, 36, (16, 32, 32, 16)),
    (5, 4, 5, 100, 36, None),
    (5, 1, 3, 64, 48, (16, 32, 16, 32)),    # block multiples: no tails
    (3, 4, 5, 33, 20, (8, 16, 8, 8)),
]


@pytest.mark.skipif(not interpreting() and not torch.cuda.is_available(), reason="needs the Triton interpreter or CUDA")
@pytest.mark.parametrize("n,k,e,d,inter,blocks", CASES)
def test_triton_matches_reference(n, k, e, d, inter, blocks, device):
    from indexcache.kernels.moe.triton import moe_experts_small_triton

    x, ids, w, gu, dn = _inputs(n, k, e, d, inter, seed=n * 100 + k, device=device,
                                ids_dtype=torch.int32 if k == 2 else torch.int64)
    want = moe_experts_small_reference(x, ids, w, gu, dn)
    # scratch poisoned with NaN: an entry the kernels fail to write shows up
    act = torch.full((n * k, inter), float("nan"), device=device)
    part = torch.full((n * k, d), float("nan"), device=device)
    kw = dict(zip(("block_i", "block_d", "block_d2", "block_i2"), blocks)) if blocks else {}
    got = moe_experts_small_triton(x, ids, w, gu, dn, act=act, part=part, **kw)
    assert got.dtype == x.dtype and got.shape == (n, d)
    torch.testing.assert_close(act, _act_ref(x, ids, gu), rtol=1e-5, atol=1e-5)
    assert not part.isnan().any()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # the public entry point takes the same path
    torch.testing.assert_close(moe_experts_small(x, ids, w, gu, dn), want, rtol=1e-5, atol=1e-5)


def test_reference_matches_model_experts():
    from indexcache.model.moe import Experts
    from indexcache.presets import preset_config

    cfg = preset_config("tiny").replace(n_routed_experts=5, hidden_size=24, moe_intermediate_size=12)
    torch.manual_seed(3)
    experts = Experts(cfg)
    with torch.no_grad():
        experts.gate_up.normal_(0, 0.3)
        experts.down.normal_(0, 0.3)
    x = torch.randn(4, 24)
    ids = torch.tensor([[0, 3], [3, 3], [4, 1], [0, 2]])
    w = torch.rand(4, 2) + 0.1
    with torch.no_grad():
        want = experts(x, ids, w)
        got = moe_experts_small_reference(x, ids, w, experts.gate_up, experts.down)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_empty_batch_and_constant():
    x, ids, w, gu, dn = _inputs(1, 2, 3, 8, 4)
    y = moe_experts_small(x[:0], ids[:0], w[:0], gu, dn)
    assert y.shape == (0, 8)
    assert isinstance(SMALL_MAX_ROWS, int) and SMALL_MAX_ROWS >= 1


def test_bad_inputs():
    x, ids, w, gu, dn = _inputs(2, 2, 3, 8, 4)
    f = moe_experts_small
    with pytest.raises(ValueError, match="x must be"):
        f(x[0], ids, w, gu, dn)
    with pytest.raises(ValueError, match="x must be"):
        f(x.double(), ids, w, gu, dn)
    with pytest.raises(ValueError, match="ids must be"):
        f(x, ids.float(), w, gu, dn)
    with pytest.raises(ValueError, match="ids must be"):
        f(x, ids[:1], w[:1], gu, dn)
    with pytest.raises(ValueError, match="weights must be"):
        f(x, ids, w[:, :1], gu, dn)
    with pytest.raises(ValueError, match="weights must be"):
        f(x, ids, ids, gu, dn)
    with pytest.raises(ValueError, match="gate_up must be"):
        f(x, ids, w, gu[:, :, :7], dn)
    with pytest.raises(ValueError, match="gate_up must be"):
        f(x, ids, w, gu[:, :7], dn)
    with pytest.raises(ValueError, match="down must be"):
        f(x, ids, w, gu, dn[:, :, :3])
    with pytest.raises(ValueError, match="down must be"):
        f(x, ids, w, gu, dn[:2])
    with pytest.raises(ValueError, match="dtype"):
        f(x, ids, w, gu.half(), dn)
    with pytest.raises(ValueError, match="meta"):
        f(x, ids, w, gu, dn.to("meta"))


@pytest.mark.gpu
@pytest.mark.parametrize("n", [1, 8])
def test_gpu_bf16_real_sizes(n):
    e, k, d, inter = 64, 4, 2048, 1536
    x, ids, w, gu, dn = _inputs(n, k, e, d, inter, seed=n, dtype=torch.bfloat16, device="cuda")
    got = moe_experts_small(x, ids, w, gu, dn)
    want = moe_experts_small_reference(x, ids, w, gu, dn)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want.float(), rtol=1.6e-2, atol=1e-2 * want.float().abs().max().item())
