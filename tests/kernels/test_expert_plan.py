"""The MoE routing plan: the Triton kernel (interpreter on CPU) against the PyTorch reference on ragged routings
(experts with no pairs, every pair on one expert, more experts than pairs), with poisoned outputs; the reference's
tile map against a plain loop."""
import pytest
import torch

from indexcache.kernels._dispatch import interpreting
from indexcache.kernels.expert_plan import expert_plan, expert_plan_reference, tile_map_reference


def _routing(n, k, e, *, seed, device, skew=False):
    g = torch.Generator(device).manual_seed(seed)
    if skew:  # a few experts get most pairs, several none
        ids = (torch.rand(n, k, generator=g, device=device) ** 4 * (e // 2)).long()
    else:
        ids = torch.stack([torch.randperm(e, generator=g, device=device)[:k] for _ in range(n)]) if n else \
            torch.zeros(0, k, dtype=torch.long, device=device)
    return ids, torch.rand(n, k, generator=g, device=device) + 0.05


def test_tile_map_reference_is_the_plain_loop():
    counts = torch.tensor([5, 0, 17, 64, 1, 0])
    te, tr = tile_map_reference(counts, int(counts.sum()), 16)
    want_e, want_r, start = [], [], 0
    for e, c in enumerate(counts.tolist()):
        for r in range(0, c, 16):
            want_e.append(e)
            want_r.append(start + r)
        start += c
    n = len(want_e)
    assert te[:n].tolist() == want_e and tr[:n].tolist() == want_r
    assert (te[n:] == len(counts)).all() and te.shape[0] == -(-int(counts.sum()) // 16) + len(counts)


@pytest.mark.skipif(not interpreting() and not torch.cuda.is_available(), reason="needs the Triton interpreter or CUDA")
@pytest.mark.parametrize("n,k,e,blocks,skew", [(37, 4, 8, (16, 64), False), (300, 2, 64, (64, 128), True),
                                                (1, 8, 256, (64,), False), (50, 1, 3, (16, 16), True),
                                                (9, 4, 64, (128,), True),
                                                (2100, 8, 256, (64, 128), True)])  # 2 chunks per span
def test_triton_matches_reference(n, k, e, blocks, skew, device, monkeypatch):
    from indexcache.kernels.expert_plan.triton import expert_plan_triton

    ids, w = _routing(n, k, e, seed=n * k + e, device=device, skew=skew)
    want = expert_plan_reference(ids, w, e, blocks)
    real_empty = torch.empty

    def poisoned(*shape, dtype=None, device=None, **kw):  # every output starts as garbage
        t = real_empty(*shape, dtype=dtype, device=device, **kw)
        return t.fill_(float("nan") if t.is_floating_point() else -7)

    monkeypatch.setattr(torch, "empty", poisoned)
    got = expert_plan_triton(ids, w, e, blocks)
    monkeypatch.undo()
    for f in ("counts", "pair", "token", "weight", "expert_end"):
        assert torch.equal(getattr(got, f), getattr(want, f)), f
    assert set(got.tiles) == set(want.tiles)
    for b, (te, tr) in want.tiles.items():
        gte, gtr = got.tiles[b]
        assert torch.equal(gte, te), b
        live = te < e  # spare tiles' rows are never read
        assert torch.equal(gtr[live], tr[live]), b


def test_checks():
    ids = torch.zeros(3, 2, dtype=torch.long)
    w = torch.ones(3, 2)
    with pytest.raises(ValueError, match="ids must be int32/int64"):
        expert_plan(ids.float(), w, 4)
    with pytest.raises(ValueError, match="weights must be a float tensor"):
        expert_plan(ids, w[:2], 4)
    with pytest.raises(ValueError, match=r"expert ids must be in \[0, 4\), got \[0, 9\]"):
        expert_plan_reference(torch.tensor([[0, 9]]), torch.ones(1, 2), 4)
