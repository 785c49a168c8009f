"""Rotary embedding: Triton (interpreter on CPU) vs the PyTorch reference, written into slices of wider buffers and
in place, both pair layouts, ragged head counts and rope widths, NaN-poisoned outputs."""
import pytest
import torch

from indexcache.kernels.rope import rope, rope_reference


def _case(t, h, r, dtype, device, seed, head_stride=None):
    g = torch.Generator().manual_seed(seed)
    hs = head_stride or r
    x = (torch.randn(t, h, hs, generator=g) * 3).to(dtype).to(device)[..., hs - r:]  # a strided slice when hs > r
    ang = torch.rand(t, r // 2, generator=g) * 100
    return x, ang.cos().to(dtype).to(device), ang.sin().to(dtype).to(device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("interleaved", [True, False])
@pytest.mark.parametrize("t,h,r,hs", [(23, 4, 16, 48), (7, 20, 64, 256), (5, 3, 12, None), (1, 1, 64, None)])
def test_rope_into_a_slice_equals_reference(dtype, interleaved, t, h, r, hs, device):
    x, cos, sin = _case(t, h, r, dtype, device, seed=t * h + r, head_stride=hs)
    buf = torch.full((t, h, 40 + r), float("nan"), dtype=dtype, device=device)
    got = rope(x, cos, sin, interleaved, out=buf[..., 40:])
    want = rope_reference(x, cos[:, None], sin[:, None], interleaved)
    assert torch.equal(got, want)  # the same roundings op by op
    assert torch.isnan(buf[..., :40]).all()  # nothing written outside the slice


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("interleaved", [True, False])
def test_rope_in_place_on_the_first_dims(dtype, interleaved, device):
    # the indexer's form: rotate q[..., :r] of [T, H, D] in place, the rest untouched
    t, h, d, r = 13, 6, 32, 16
    g = torch.Generator().manual_seed(5)
    q = torch.randn(t, h, d, generator=g).to(dtype).to(device)
    ang = torch.rand(t, r // 2, generator=g) * 50
    cos, sin = ang.cos().to(dtype).to(device), ang.sin().to(dtype).to(device)
    want = torch.cat([rope_reference(q[..., :r], cos[:, None], sin[:, None], interleaved), q[..., r:]], -1)
    rope(q[..., :r], cos, sin, interleaved, out=q[..., :r])
    assert torch.equal(q, want)


def test_rope_new_output_and_bad_input(device):
    x, cos, sin = _case(4, 2, 8, torch.float32, device, seed=0)
    assert torch.equal(rope(x, cos, sin, True), rope_reference(x, cos[:, None], sin[:, None], True))
    assert rope(x[:0], cos[:0], sin[:0], True).shape == (0, 2, 8)
    with pytest.raises(ValueError, match="cos must be"):
        rope(x, cos[:, :2], sin, True)
    with pytest.raises(ValueError, match="out must be"):
        rope(x, cos, sin, True, out=torch.empty(4, 2, 8, dtype=torch.float16, device=device))
    with pytest.raises(ValueError, match="x must be"):
        rope(x[..., :7], cos, sin, True)


@pytest.mark.gpu
@pytest.mark.parametrize("interleaved", [True, False])
def test_rope_bf16_on_gpu(interleaved):
    x, cos, sin = _case(4096, 20, 64, torch.bfloat16, "cuda", seed=1, head_stride=256)
    buf = torch.full((4096, 20, 576), float("nan"), dtype=torch.bfloat16, device="cuda")
    got = rope(x, cos, sin, interleaved, out=buf[..., 512:])
    assert torch.equal(got, rope_reference(x, cos[:, None], sin[:, None], interleaved))
    q = torch.randn(999, 32, 128, dtype=torch.bfloat16, device="cuda")
    c, s = cos[:999], sin[:999]
    want = torch.cat([rope_reference(q[..., :64], c[:, None], s[:, None], interleaved), q[..., 64:]], -1)
    rope(q[..., :64], c, s, interleaved, out=q[..., :64])
    assert torch.equal(q, want)
