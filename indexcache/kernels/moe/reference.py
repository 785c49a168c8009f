"""PyTorch reference for the routed experts at decode batch sizes, and the input checks shared with the kernel.

Shapes: x [N, D], ids [N, K] (expert ids in [0, E)), weights [N, K], gate_up [E, 2I, D] (rows 0..I-1 gate,
I..2I-1 up, as ``Experts.gate_up``), down [E, D, I]. Output y [N, D] in x.dtype with
    y[n] = sum_k weights[n, k] * down[e] @ (silu(gate_e @ x[n]) * (up_e @ x[n])),   e = ids[n, k],
computed in fp32. FP8 experts (float8_e4m3fn gate_up/down) come with their 128x128 block scales: gate_up_scale
[E, 2*ceil(I/128), ceil(D/128)] (gate's blocks, then up's) and down_scale [E, ceil(D/128), ceil(I/128)]; the
weights are dequantised (activations stay in x's dtype).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def check_moe_inputs(name, x, ids, weights, gate_up, down, gate_up_scale=None, down_scale=None):
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
    fp8 = gate_up.dtype == torch.float8_e4m3fn
    if fp8:
        ib, db = -(-inter // 128), -(-d // 128)
        if down.dtype != gate_up.dtype:
            raise ValueError(f"{name}: gate_up is FP8, down is {down.dtype}")
        if gate_up_scale is None or tuple(gate_up_scale.shape) != (e, 2 * ib, db) or \
                down_scale is None or tuple(down_scale.shape) != (e, db, ib):
            raise ValueError(f"{name}: FP8 experts need gate_up_scale {(e, 2 * ib, db)} and down_scale {(e, db, ib)}, "
                             f"got {None if gate_up_scale is None else tuple(gate_up_scale.shape)} and "
                             f"{None if down_scale is None else tuple(down_scale.shape)}")
    elif gate_up.dtype != x.dtype or down.dtype != x.dtype:
        raise ValueError(f"{name}: gate_up and down must have x's dtype {x.dtype} (or be float8_e4m3fn with scales), "
                         f"got {gate_up.dtype}, {down.dtype}")
    elif gate_up_scale is not None or down_scale is not None:
        raise ValueError(f"{name}: block scales are for FP8 experts, the weights are {gate_up.dtype}")
    scales = (("gate_up_scale", gate_up_scale), ("down_scale", down_scale)) if fp8 else ()
    for what, t in (("ids", ids), ("weights", weights), ("gate_up", gate_up), ("down", down)) + scales:
        if t.device != x.device:
            raise ValueError(f"{name}: {what} is on {t.device}, x on {x.device}")


def _expert_fp32(w_e, s_e):
    """One expert's matrix in fp32: as is, or dequantised from FP8 with its [rows/128, cols/128] block scales."""
    if s_e is None:
        return w_e.float()
    r, c = w_e.shape
    return w_e.float() * s_e.float().repeat_interleave(128, 0)[:r].repeat_interleave(128, 1)[:, :c]


def moe_experts_small_reference(x, ids, weights, gate_up, down, gate_up_scale=None, down_scale=None):
    """One (token, slot) pair at a time, fp32 throughout; cast to x.dtype at the end."""
    check_moe_inputs("moe_experts_small_reference", x, ids, weights, gate_up, down, gate_up_scale, down_scale)
    inter = gate_up.shape[1] // 2
    if gate_up_scale is not None:
        ib = -(-inter // 128)
        gu = [torch.cat([_expert_fp32(gate_up[e, :inter], gate_up_scale[e, :ib]),
                         _expert_fp32(gate_up[e, inter:], gate_up_scale[e, ib:])]) for e in range(gate_up.shape[0])]
        dn = [_expert_fp32(down[e], down_scale[e]) for e in range(down.shape[0])]
        gate_up, down = torch.stack(gu), torch.stack(dn)
    y = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for n in range(ids.shape[0]):
        xn = x[n].float()
        for k in range(ids.shape[1]):
            e = int(ids[n, k])
            gate, up = (gate_up[e].float() @ xn).split(inter)
            y[n] += weights[n, k].float() * (down[e].float() @ (F.silu(gate) * up))
    return y.to(x.dtype)
