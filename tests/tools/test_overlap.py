import torch

from indexcache.tools.overlap import pairwise_overlap, row_overlap


def test_row_overlap_counts_sets_not_order():
    a = torch.tensor([[3, 1, 7, -1]])
    b = torch.tensor([[7, 2, 3, -1]])
    inter, n = row_overlap(a, b)
    assert inter.tolist() == [2] and n.tolist() == [3]


def test_self_overlap_is_one_and_disjoint_is_zero():
    g = torch.Generator().manual_seed(0)
    T, k = 50, 8
    rows = [torch.randperm(t + 1, generator=g)[:k] for t in range(T)]
    a = torch.stack([torch.nn.functional.pad(r, (0, k - len(r)), value=-1) for r in rows])[None]
    shifted = torch.where(a >= 0, a + 1000, a)  # no shared token
    ov = pairwise_overlap([a, a.clone(), shifted])
    assert ov[0, 1] == 1.0 and ov[0, 0] == 1.0
    assert ov[0, 2] == 0.0
