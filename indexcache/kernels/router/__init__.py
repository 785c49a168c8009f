"""The DeepSeek ``noaux_tc`` MoE router (sigmoid scores, correction bias, group limit, top-k, normalised weights)
in one launch."""
from indexcache.kernels.router.ops import kernel_supports, route, router_topk
from indexcache.kernels.router.reference import router_reference

__all__ = ["kernel_supports", "route", "router_topk", "router_reference"]
