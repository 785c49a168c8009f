"""Dense MLP and the DeepSeek MoE: sigmoid ``noaux_tc`` router (groups, correction bias, routed scaling) plus
shared experts. Expert weights are stacked so the GPU path runs one grouped GEMM per projection."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from ..kernels.expert_plan import expert_plan
from ..kernels.fp8_grouped_mm import (fp8_grouped_mm, fp8_grouped_mm_reference, fp8_grouped_swiglu,
                                     fp8_grouped_swiglu_reference, plan_block_sizes)
from ..kernels.fp8_linear import dequantize_weight, quantize_act, quantize_weight
from ..kernels.moe import SMALL_MAX_ROWS, moe_experts_small
from ..kernels.router import kernel_supports, route


class MLP(nn.Module):
    def __init__(self, hidden: int, inter: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=False)
        self.up_proj = nn.Linear(hidden, inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Router(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.hidden_size))
        self.register_buffer("e_score_correction_bias", torch.zeros(cfg.n_routed_experts, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [N, D] -> (expert ids [N, k], weights [N, k] fp32). Inference on a GPU routes in one Triton launch
        (``kernels.router``: 4 vs 22 us per decode step, 98 vs 178 us per 8K-token chunk on an H200, run 47); it
        has no backward, so training keeps the torch maths below."""
        cfg = self.cfg
        if x.is_cuda and not torch.is_grad_enabled() and kernel_supports(cfg.n_routed_experts, cfg.n_group):
            return route(x, self)
        return self.torch_forward(x)

    def torch_forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``forward`` in torch ops (autograd; the GPU kernel's reference in benchmarks)."""
        cfg = self.cfg
        scores = F.linear(x.float(), self.weight.float()).sigmoid()
        choice = scores + self.e_score_correction_bias.float()
        if cfg.n_group > 1:
            grouped = choice.view(-1, cfg.n_group, cfg.n_routed_experts // cfg.n_group)
            group_scores = grouped.topk(2, dim=-1).values.sum(-1)
            keep = torch.zeros_like(group_scores, dtype=torch.bool)
            keep.scatter_(1, group_scores.topk(cfg.topk_group, dim=-1, sorted=False).indices, True)
            choice = choice.masked_fill(~keep.repeat_interleave(grouped.shape[-1], dim=1), float("-inf"))
        ids = choice.topk(cfg.num_experts_per_tok, dim=-1, sorted=False).indices
        weights = scores.gather(1, ids)
        if cfg.norm_topk_prob:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        return ids, weights * cfg.routed_scaling_factor


class Experts(nn.Module):
    """E SwiGLU experts; gate and up projections stacked as [E, 2I, D], down as [E, D, I]. FP8 models hold them as
    fp8 e4m3 buffers with 128x128 block scales (``use_fp8_storage``): gate_up_scale_inv [E, 2*ceil(I/128),
    ceil(D/128)] (gate's blocks, then up's), down_scale_inv [E, ceil(D/128), ceil(I/128)]."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        E, D, inter = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.inter = inter
        self.gate_up = nn.Parameter(torch.empty(E, 2 * inter, D))
        self.down = nn.Parameter(torch.empty(E, D, inter))

    def use_fp8_storage(self, *, quantize: bool) -> None:
        """FP8 weights in place: quantise the current ones per 128x128 block, or allocate empty FP8 storage."""
        E, D, inter = self.gate_up.shape[0], self.gate_up.shape[2], self.inter
        dev = self.gate_up.device
        if quantize:
            tensors = quantize_experts(self.gate_up.detach(), self.down.detach())
        else:
            tensors = (torch.empty(E, 2 * inter, D, dtype=torch.float8_e4m3fn, device=dev),
                       torch.empty(E, 2 * _blocks(inter), _blocks(D), device=dev),
                       torch.empty(E, D, inter, dtype=torch.float8_e4m3fn, device=dev),
                       torch.empty(E, _blocks(D), _blocks(inter), device=dev))
        del self.gate_up, self.down
        for name, t in zip(("gate_up", "gate_up_scale_inv", "down", "down_scale_inv"), tensors):
            self.register_buffer(name, t)

    def forward(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, *,
                small_batch_kernel: bool = True) -> torch.Tensor:
        """``small_batch_kernel``: decode-sized batches (few (token, slot) pairs) on the GPU run a memory-bound
        Triton kernel (torch._grouped_mm reads the active experts at ~1.5 TB/s there); False keeps them on
        torch._grouped_mm (benchmarks compare the two through ``EngineConfig.moe_small_batch_kernel``)."""
        N, K = ids.shape
        if self.gate_up.dtype == torch.float8_e4m3fn:
            if small_batch_kernel and x.is_cuda and N * K <= SMALL_MAX_ROWS:
                return _small_batch_experts(x, ids, weights, self.gate_up, self.down, self.gate_up_scale_inv,
                                            self.down_scale_inv)
            return self._forward_fp8(x, ids, weights)
        if small_batch_kernel and _grouped_mm_ok(x) and N * K <= SMALL_MAX_ROWS:
            return _small_batch_experts(x, ids, weights, self.gate_up, self.down)
        flat = ids.flatten()
        E = self.gate_up.shape[0]
        order = expert_order(flat, E)
        token = order // K
        xs = x[token]
        if _grouped_mm_ok(xs):
            # counts by scatter_add, not bincount: no host sync, so decode can be captured in a CUDA graph
            counts = torch.zeros(E, dtype=torch.int32, device=x.device).scatter_add_(
                0, flat, torch.ones_like(flat, dtype=torch.int32))
            offs = counts.cumsum(0).to(torch.int32)
            h = torch._grouped_mm(xs, self.gate_up.transpose(1, 2), offs=offs)
            gate, up = h.split(self.inter, dim=-1)
            ys = torch._grouped_mm(F.silu(gate) * up, self.down.transpose(1, 2), offs=offs)
        else:
            ys = _expert_loop(xs, flat, self.gate_up, self.down, self.inter)
        return combine_experts(ys, order, weights)

    @torch.compiler.disable  # Triton launches with host-side checks: run as is between compiled graphs
    def _forward_fp8(self, x, ids, weights):
        """FP8 experts beyond decode sizes: two fused grouped GEMMs (no host sync), see ``fp8_experts_w8a8``."""
        return fp8_experts_w8a8(self, x, ids, weights)

    def dequantized(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(gate_up [E, 2I, D], down [E, D, I]) in ``dtype`` (FP8 storage dequantised; else the weights)."""
        if self.gate_up.dtype != torch.float8_e4m3fn:
            return self.gate_up.to(dtype), self.down.to(dtype)
        return dequantize_experts(self.gate_up, self.gate_up_scale_inv, self.down, self.down_scale_inv, dtype)


def fp8_experts_w8a8(experts: Experts, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The routed experts of FP8 ``experts`` for tokens x [N, D] routed to ``ids`` [N, K] with ``weights`` [N, K]
    -> [N, D] in x.dtype, W8A8 as the FP8 linear layers:
    - x is quantised per 1x128 group once per token; the gate/up grouped GEMM reads each (token, slot) pair's
      token row by index (no gathered copy of x), and its epilogue applies SwiGLU and quantises h for the down
      projection (``fp8_grouped_swiglu``: the [N*K, 2I] product never reaches memory);
    - the down grouped GEMM multiplies each pair's row by its routing weight and stores it in (token, slot)
      order, so combining is a fixed-order sum over K contiguous rows (bf16 in, fp32 accumulation): the same
      bits on every call.
    The routing (pairs sorted by expert, the GEMMs' tile maps) is one ``expert_plan`` per layer. The Triton kernels
    on the GPU (the down projection in Gluon on Hopper); their PyTorch references elsewhere."""
    N, K = ids.shape
    E = experts.gate_up.shape[0]
    plan = expert_plan(ids, weights, E, plan_block_sizes(N * K, E))
    if x.is_cuda:
        swiglu, mm, kw = fp8_grouped_swiglu, fp8_grouped_mm, {"plan": plan}
        # the down projection's rows are contiguous: Hopper runs the warp-specialised Gluon GEMM there, 1.38-1.44x
        # the Triton kernel at the 8K-token MoE shape (run 55); gate/up gathers token rows, which TMA cannot
        down_kw = {"gemm": "gluon"} if torch.cuda.get_device_capability(x.device)[0] == 9 else {}
    else:
        swiglu, mm, kw, down_kw = fp8_grouped_swiglu_reference, fp8_grouped_mm_reference, {}, {}
    x8, sx = quantize_act(x)
    h8, sh = swiglu(x8, plan.counts, experts.gate_up, experts.gate_up_scale_inv, sx, experts.inter, a_rows=plan.token,
                    **kw)
    pairs = mm(h8, plan.counts, experts.down, experts.down_scale_inv, sh, x.dtype, out_rows=plan.pair,
               row_weight=plan.weight, **kw, **down_kw)
    return pairs.view(N, K, -1).sum(1)


def quantize_experts(gate_up: torch.Tensor, down: torch.Tensor):
    """Per expert, per 128x128 block: (gate_up fp8, gate_up_scale_inv [E, 2*ceil(I/128), ceil(D/128)] with gate's
    blocks then up's, down fp8, down_scale_inv [E, ceil(D/128), ceil(I/128)])."""
    inter = gate_up.shape[1] // 2
    gq, gs, dq, ds = [], [], [], []
    for e in range(gate_up.shape[0]):
        (g8, g_s), (u8, u_s) = quantize_weight(gate_up[e, :inter]), quantize_weight(gate_up[e, inter:])
        gq.append(torch.cat([g8, u8]))
        gs.append(torch.cat([g_s, u_s]))
        d8, d_s = quantize_weight(down[e])
        dq.append(d8)
        ds.append(d_s)
    return torch.stack(gq), torch.stack(gs), torch.stack(dq), torch.stack(ds)


def dequantize_experts(gate_up, gate_up_scale_inv, down, down_scale_inv, dtype):
    inter = gate_up.shape[1] // 2
    ib = _blocks(inter)
    gu = torch.stack([torch.cat([dequantize_weight(gate_up[e, :inter], gate_up_scale_inv[e, :ib], dtype),
                                 dequantize_weight(gate_up[e, inter:], gate_up_scale_inv[e, ib:], dtype)])
                      for e in range(gate_up.shape[0])])
    dn = torch.stack([dequantize_weight(down[e], down_scale_inv[e], dtype) for e in range(down.shape[0])])
    return gu, dn


def combine_experts(ys: torch.Tensor, order: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted sum of each token's K expert outputs: ``ys`` [N*K, D] rows in expert order (row p is pair
    ``order[p]`` = token * K + slot), ``weights`` [N, K] -> [N, D] in ys.dtype. The rows go back to (token, slot)
    order and are summed over slots with fp32 accumulation in a fixed order, so a token's output does not depend
    on atomic ordering (an ``index_add_`` of bf16 rows made serving differ between runs). On CUDA a batched GEMM
    with the weights in ys.dtype, as the old combine rounded them (H200: 2x faster than that ``index_add_``,
    benchmarks/moe_combine.py); elsewhere an fp32 sum."""
    N, K = weights.shape
    pairs = torch.empty_like(ys).index_copy_(0, order, ys).view(N, K, -1)
    if ys.is_cuda:  # one read of the pairs, fp32 accumulation inside the batched GEMM, one rounding
        return torch.bmm(weights.to(ys.dtype)[:, None, :], pairs)[:, 0]
    return (pairs.float() * weights.float()[:, :, None]).sum(1).to(ys.dtype)


@torch.compiler.disable  # a Triton launch with host-side checks: runs as is between compiled graphs
def _small_batch_experts(x, ids, weights, gate_up, down, gate_up_scale=None, down_scale=None):
    return moe_experts_small(x, ids, weights, gate_up, down, gate_up_scale, down_scale)


@torch.compiler.disable  # data-dependent slicing: tracing it would recompile whenever the routing changes
def _expert_loop(xs, flat, gate_up, down, inter):
    """The reference path: rows ``xs`` sorted by expert id ``flat``, one expert at a time."""
    ys = torch.empty_like(xs)
    start = 0
    for e, n in enumerate(torch.bincount(flat, minlength=gate_up.shape[0]).tolist()):
        if n:
            gate, up = F.linear(xs[start:start + n], gate_up[e]).split(inter, dim=-1)
            ys[start:start + n] = F.linear(F.silu(gate) * up, down[e])
        start += n
    return ys


_ONE_HOT_MAX = 1 << 16  # (token, slot) pairs x experts up to which expert_order counts instead of sorting


def expert_order(flat: torch.Tensor, num_experts: int) -> torch.Tensor:
    """The stable argsort of expert ids ``flat`` [M]. Small batches (decode) count with a one-hot cumsum instead:
    a sort is three radix-sort launches, the counting is a few elementwise ops that torch.compile fuses."""
    M = flat.numel()
    if M * num_experts > _ONE_HOT_MAX:
        return flat.argsort(stable=True)
    onehot = F.one_hot(flat, num_experts)                      # [M, E]
    counts = onehot.sum(0)
    before = counts.cumsum(0) - counts                         # entries with a smaller expert id
    rank = (onehot.cumsum(0) - onehot).gather(1, flat[:, None])[:, 0]  # earlier entries with the same id
    dest = before[flat] + rank
    return torch.empty_like(flat).scatter_(0, dest, torch.arange(M, device=flat.device))


def _blocks(n: int) -> int:
    return -(-n // 128)


def _grouped_mm_ok(x: torch.Tensor) -> bool:
    # torch._grouped_mm runs on Hopper-class GPUs in bf16; the CPU reference path loops over experts.
    return x.is_cuda and x.dtype == torch.bfloat16 and hasattr(torch, "_grouped_mm")


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate = Router(cfg)
        self.experts = Experts(cfg)
        self.shared_experts = MLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts)

    def forward(self, x: torch.Tensor, *, small_batch_kernel: bool = True) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        ids, weights = self.gate(flat)
        routed = self.experts(flat, ids, weights, small_batch_kernel=small_batch_kernel)
        return (routed + self.shared_experts(flat)).view(shape)
