"""Logical key positions -> slot ids (``kernels.slots.to_slots``): the Triton kernel (interpreter on CPU, tiles
small enough that rows span several programs) against the PyTorch reference on fresh random block tables and
positions: ragged widths (masked tails), -1 entries, a block-table row broadcast over a segment's rows (stride 0)
and one row per query, int64 positions, poisoned (-7777) outputs; bad input; the GPU at an F layer's pool width."""
import pytest
import torch

from indexcache.kernels.slots import to_slots
from indexcache.kernels.slots.reference import to_slots_reference
from indexcache.kernels.slots.triton import to_slots_triton
from tests.helpers import poisoned


def _case(rows, k, blocks, page, seed, device="cpu", broadcast=False):
    g = torch.Generator().manual_seed(seed)
    pages = torch.randperm(4 * blocks * rows + 3, generator=g)[: blocks * (1 if broadcast else rows)]
    table = pages.view(-1, blocks).to(torch.int32)
    table = table.expand(rows, -1) if broadcast else table
    logical = torch.randint(0, blocks * page, (rows, k), generator=g, dtype=torch.int32)
    logical[torch.rand(rows, k, generator=g) < 0.2] = -1
    logical[0, -3:] = -1                                  # padding at the end of a row
    return logical.to(device), table.to(device)


@pytest.mark.parametrize("rows,k", [(5, 300), (1, 1), (3, 128), (7, 257)])
@pytest.mark.parametrize("broadcast", [False, True], ids=["per-row", "broadcast"])
def test_matches_the_reference(rows, k, broadcast):
    logical, table = _case(rows, k, blocks=9, page=64, seed=rows * k + broadcast, broadcast=broadcast)
    ref = to_slots_reference(logical, table, 64)
    got = to_slots_triton(logical, table, 64, out=poisoned((rows, k), torch.int32, "cpu"))
    assert torch.equal(got, ref)
    assert torch.equal(to_slots(logical.long(), table.long(), 64), ref)  # int64 inputs, through the dispatcher
    assert ((ref == -1) == (logical < 0)).all() and got.dtype == torch.int32


def test_other_page_size_and_empty():
    logical, table = _case(4, 200, blocks=5, page=16, seed=3)
    assert torch.equal(to_slots(logical, table, 16), to_slots_reference(logical, table, 16))
    assert to_slots(torch.empty(0, 8, dtype=torch.int32), torch.empty(0, 2, dtype=torch.int32), 64).shape == (0, 8)
    assert to_slots(torch.empty(3, 0, dtype=torch.int32), torch.zeros(3, 2, dtype=torch.int32), 64).shape == (3, 0)


def test_bad_input_names_the_value():
    lg = torch.zeros(2, 4, dtype=torch.int32)
    tab = torch.zeros(2, 3, dtype=torch.int32)
    with pytest.raises(ValueError, match=r"logical must be \[T,k\] int32/int64, got \(2, 4\) torch.float32"):
        to_slots(lg.float(), tab, 64)
    with pytest.raises(ValueError, match=r"table must be \[T=2, blocks\] int32/int64, got \(3, 3\)"):
        to_slots(lg, torch.zeros(3, 3, dtype=torch.int32), 64)
    with pytest.raises(ValueError, match="page must be a positive int, got 0"):
        to_slots(lg, tab, 0)


@pytest.mark.gpu
@pytest.mark.parametrize("k", [2048, 8192, 8191])
@pytest.mark.parametrize("broadcast", [False, True], ids=["per-row", "broadcast"])
def test_gpu_pool_widths(k, broadcast):
    logical, table = _case(4096, k, blocks=3200, page=64, seed=k, device="cuda", broadcast=broadcast)
    got = to_slots_triton(logical, table, 64, out=poisoned((4096, k), torch.int32, "cuda"))
    assert torch.equal(got, to_slots_reference(logical, table, 64))
