"""Rotary position embedding written where its result goes (a slice of a wider buffer, or in place): ``ops``
dispatches, ``reference`` is plain PyTorch, ``triton`` holds the kernel."""
from indexcache.kernels.rope.ops import rope
from indexcache.kernels.rope.reference import rope_reference

__all__ = ["rope", "rope_reference"]
