"""Paged-cache addressing: logical key positions -> global slot ids through a block table (``ops.to_slots``);
``reference`` is plain PyTorch, ``triton`` holds the kernel."""
from indexcache.kernels.slots.ops import to_slots

__all__ = ["to_slots"]
