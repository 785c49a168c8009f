"""The DeepSeek ``noaux_tc`` MoE router: checks and dispatch (Triton on CUDA or under TRITON_INTERPRET=1, the
PyTorch reference otherwise)."""
from __future__ import annotations

import torch

from indexcache.kernels._dispatch import use_triton
from indexcache.kernels.router.reference import check_router_inputs, router_reference


def kernel_supports(num_experts: int, n_group: int) -> bool:
    """The kernel groups experts by a reshape: with n_group > 1 the expert count and n_group are powers of two
    (DeepSeek-V3.2: 256 in 8). Without groups any expert count runs."""
    pow2 = lambda v: v & (v - 1) == 0  # noqa: E731
    return n_group == 1 or (pow2(num_experts) and pow2(n_group))


@torch.library.custom_op("indexcache::router_topk", mutates_args=())
def _router_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, top_k: int, n_group: int,
               topk_group: int, norm: bool, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One Triton launch; opaque to torch.compile (fresh outputs, no host sync: CUDA-graph safe)."""
    from indexcache.kernels.router.triton import router_triton

    return router_triton(x, weight, bias, top_k, n_group, topk_group, norm, scale)


@_router_op.register_fake
def _(x, weight, bias, top_k, n_group, topk_group, norm, scale):
    n = x.shape[0]
    return x.new_empty(n, top_k, dtype=torch.int64), x.new_empty(n, top_k, dtype=torch.float32)


def router_topk(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, top_k: int, *, n_group: int = 1,
                topk_group: int = 1, norm: bool = True, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """x [N, D] float, weight [E, D] float, bias [E] (the correction bias) -> (ids [N, top_k] int64, weights
    [N, top_k] fp32), the maths of reference.py with fp32 accumulation. A token's ids come in descending order
    of choice (score + bias); exact ties go to the lower expert (and the lower group)."""
    check_router_inputs("router_topk", x, weight, bias, top_k, n_group, topk_group)
    if use_triton(x) and kernel_supports(weight.shape[0], n_group):
        return _router_op(x, weight, bias, top_k, n_group, topk_group, bool(norm), float(scale))
    return router_reference(x, weight, bias, top_k, n_group=n_group, topk_group=topk_group, norm=norm, scale=scale)


def route(x: torch.Tensor, router_module) -> tuple[torch.Tensor, torch.Tensor]:
    """``router_module``'s routing of x [N, D] (a ``model.moe.Router``: its cfg, weight and e_score_correction_bias)
    by ``router_topk``: the maths of ``Router.forward`` in one launch on the GPU."""
    cfg = router_module.cfg
    return router_topk(x, router_module.weight, router_module.e_score_correction_bias, cfg.num_experts_per_tok,
                       n_group=cfg.n_group, topk_group=cfg.topk_group, norm=cfg.norm_topk_prob,
                       scale=cfg.routed_scaling_factor)
