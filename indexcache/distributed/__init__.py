"""Tensor and expert parallelism on torch.distributed (NCCL on GPUs, gloo on CPUs); the plan is docs/parallel.md."""
from .context import ParallelContext, ParallelError, init_distributed, shutdown, single
from .loading import LoadReport, load_sharded, random_shard
from .shard import shard_model, use_fp8_shard_storage

__all__ = ["ParallelContext", "ParallelError", "init_distributed", "shutdown", "single", "shard_model",
           "load_sharded", "random_shard", "LoadReport",
           "use_fp8_shard_storage"]
