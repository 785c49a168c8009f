"""MoE routing helpers."""
import pytest
import torch

from indexcache.model.moe import expert_order


@pytest.mark.parametrize("m,e", [(1, 64), (4, 64), (37, 8), (1000, 64), (5000, 64), (3, 3)])
def test_expert_order_is_the_stable_argsort(m, e):
    flat = torch.randint(0, e, (m,), generator=torch.Generator().manual_seed(m + e))
    assert torch.equal(expert_order(flat, e), flat.argsort(stable=True))
