"""RMSNorm (optionally after a residual add) in one pass: ``ops`` dispatches, ``reference`` is plain PyTorch,
``triton`` holds the kernel."""
from indexcache.kernels.rms_norm.ops import rms_norm
from indexcache.kernels.rms_norm.reference import rms_norm_reference

__all__ = ["rms_norm", "rms_norm_reference"]
