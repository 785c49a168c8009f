"""PyTorch reference for the routed experts at decode batch sizes, and the input checks shared with the kernel.

Shapes: x [N, D], ids [N, K] (expert ids in [0, E)), weights [N, K], gate_up [E, 2I, D] (rows 0..I-1 gate,
I..2I-1 up, as ``Experts.gate_up``), down [E, D, I]. Output y [N, D] in x.dtype with
    y[n] = sum_k weights[n, k] * down[e] @ (silu(gate_e @ x[n]) * (up_e @ x[n])),   e = ids[n, k],
computed in fp32.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def check_moe_inputs(name, x, ids, weights, gate_up, down):
    """Shape, dtype and device checks (host metadata only, so no device sync). The range of ``ids`` is NOT checked:
    that would need a sync; an id outside [0, E) makes the kernel read outside the weights (undefined)."""
    if x.dim() != 2 or x.dtype not in _FLOATS:
        raise ValueError(f"{name}: x must be [N, D] float32/float16/bfloat16, got {tuple(x.shape)} {x.dtype}")
    n, d = x.shape
    if ids.dim() != 2 or ids.shape[0] != n or ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{name}: ids must be [N, K] with N={n}, int32/int64, got {tuple(ids.shape)} {ids.dtype}")
    if tuple(weights.shape) != tuple(ids.shape) or not weights.dtype.is_floating_point:
        raise ValueError(f"{name}: weights must be float with ids' shape {tuple(ids.shape)}, "
                         f"got {tuple(weights.shape)} {weights.dtype}")
    if gate_up.dim() != 3 or gate_up.shape[2] != d or gate_up.shape[1] % 2 or gate_up.shape[1] == 0:
        raise ValueError(f"{name}: gate_up must be [E, 2I, D] with D={d} and I > 0, got {tuple(gate_up.shape)}")
    e, inter = gate_up.shape[0], gate_up.shape[1] // 2
    if tuple(down.shape) != (e, d, inter):
        raise ValueError(f"{name}: down must be [E, D, I]=({e}, {d}, {inter}), got {tuple(down.shape)}")
    if gate_up.dtype != x.dtype or down.dtype != x.dtype:
        raise ValueError(f"{name}: gate_up and down must have x's dtype {x.dtype}, got {gate_up.dtype}, {down.dtype}")
    for what, t in (("ids", ids), ("weights", weights), ("gate_up", gate_up), ("down", down)):
        if t.device != x.device:
            raise ValueError(f"{name}: {what} is on {t.device}, x on {x.device}")


def moe_experts_small_reference(x, ids, weights, gate_up, down):
    """One (token, slot) pair at a time, fp32 throughout; cast to x.dtype at the end."""
    check_moe_inputs("moe_experts_small_reference", x, ids, weights, gate_up, down)
    inter = gate_up.shape[1] // 2
    y = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for n in range(ids.shape[0]):
        xn = x[n].float()
        for k in range(ids.shape[1]):
            e = int(ids[n, k])
            gate, up = (gate_up[e].float() @ xn).split(inter)
            y[n] += weights[n, k].float() * (down[e].float() @ (F.silu(gate) * up))
    return y.to(x.dtype)
