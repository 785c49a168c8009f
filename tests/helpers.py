"""Small helpers shared by tests."""
import torch


def poisoned(shape, dtype, device):
    """An output buffer full of NaN (or -7777 for ints), so unwritten elements show up."""
    if dtype.is_floating_point and dtype.itemsize >= 2:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    if dtype.is_floating_point:
        return torch.full(shape, float("nan"), dtype=torch.float32, device=device).to(dtype)
    return torch.full(shape, -7777, dtype=dtype, device=device)
