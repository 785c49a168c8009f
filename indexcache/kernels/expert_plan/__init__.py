"""The MoE routing plan: (token, slot) pairs sorted by expert and the grouped GEMMs' tile maps, in one launch."""
from indexcache.kernels.expert_plan.ops import expert_plan
from indexcache.kernels.expert_plan.reference import ExpertPlan, expert_plan_reference, tile_map_reference

__all__ = ["ExpertPlan", "expert_plan", "expert_plan_reference", "tile_map_reference"]
