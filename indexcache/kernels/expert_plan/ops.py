"""The MoE routing plan: checks and dispatch (Triton on CUDA or under TRITON_INTERPRET=1, the reference
otherwise)."""
from __future__ import annotations

import torch

from indexcache.kernels._dispatch import use_triton
from indexcache.kernels.expert_plan.reference import ExpertPlan, check_plan_inputs, expert_plan_reference


def expert_plan(ids: torch.Tensor, weights: torch.Tensor, num_experts: int, block_sizes=(64,)) -> ExpertPlan:
    """ids [N, K] (each token's experts, in [0, num_experts)), weights [N, K] -> the expert-sorted pairs and the
    grouped GEMMs' tile maps for one or two ``block_sizes`` (see reference.py)."""
    check_plan_inputs("expert_plan", ids, weights, num_experts, block_sizes)
    if use_triton(ids) and ids.numel():
        from indexcache.kernels.expert_plan.triton import expert_plan_triton

        return expert_plan_triton(ids, weights, num_experts, block_sizes)
    return expert_plan_reference(ids, weights, num_experts, block_sizes)
