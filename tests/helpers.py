"""Small helpers shared by tests."""
import torch


def poisoned(shape, dtype, device):
    """An output buffer full of NaN (-7777 for wide signed ints, the maximum for others), so unwritten elements
    show up."""
    if dtype.is_floating_point and dtype.itemsize >= 2:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    if dtype.is_floating_point:
        return torch.full(shape, float("nan"), dtype=torch.float32, device=device).to(dtype)
    fill = -7777 if torch.iinfo(dtype).min < 0 and torch.iinfo(dtype).bits >= 16 else torch.iinfo(dtype).max
    return torch.full(shape, fill, dtype=dtype, device=device)


def poison_torch_empty(monkeypatch):
    """Make ``torch.empty`` return ``poisoned`` buffers (for the test's duration), so any element a kernel leaves
    unwritten in its outputs or scratch shows up."""
    def empty(*shape, dtype=None, device=None, **kw):
        shape = tuple(shape[0]) if len(shape) == 1 and isinstance(shape[0], (tuple, list, torch.Size)) else shape
        return poisoned(shape, dtype or torch.get_default_dtype(), device or "cpu")

    monkeypatch.setattr(torch, "empty", empty)


def count_allocations(monkeypatch) -> list:
    """Record the bytes of every outermost ``torch.empty`` / ``zeros`` / ``full`` call (for the test's duration) in
    the returned list (``zeros`` / ``full`` may allocate through ``empty``: counted once)."""
    allocated, depth = [], [0]
    for name in ("empty", "zeros", "full"):
        def counted(*a, _f=getattr(torch, name), **kw):
            depth[0] += 1
            try:
                t = _f(*a, **kw)
            finally:
                depth[0] -= 1
            if depth[0] == 0:
                allocated.append(t.numel() * t.element_size())
            return t
        monkeypatch.setattr(torch, name, counted)
    return allocated
