"""Who this process is among the tensor-parallel ranks: a ``ParallelContext`` passed explicitly to everything that
shards or communicates (no layer asks torch.distributed who it is)."""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


class ParallelError(ValueError):
    """A model shape or option that cannot be split over the requested ranks, with the numbers named."""


@dataclass(frozen=True)
class ParallelContext:
    rank: int = 0
    world_size: int = 1
    group: object = None                 # the torch.distributed ProcessGroup (None: the default group)
    expert_parallel: bool = False        # routed experts split by expert (EP) instead of by intermediate dim (TP)
    device: torch.device = torch.device("cpu")

    def __post_init__(self):
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ParallelError(f"rank {self.rank} is not in a world of {self.world_size}")

    @property
    def is_single(self) -> bool:
        return self.world_size == 1

    def even_range(self, n: int, what: str) -> tuple[int, int]:
        """This rank's [start, stop) of ``n`` items split evenly; ``n`` must divide by the world size."""
        if n % self.world_size:
            raise ParallelError(f"{what} ({n}) is not divisible by the tensor-parallel size {self.world_size}")
        per = n // self.world_size
        return self.rank * per, (self.rank + 1) * per

    def padded_range(self, n: int) -> tuple[int, int, int]:
        """(start, stop, per) of ``n`` items in chunks of ceil(n / world); the last ranks may hold fewer (or none)."""
        per = -(-n // self.world_size)
        return min(n, self.rank * per), min(n, (self.rank + 1) * per), per


def single(device="cpu") -> ParallelContext:
    return ParallelContext(device=torch.device(device))


def init_distributed(*, rank: int | None = None, world_size: int | None = None, init_method: str | None = None,
                     backend: str | None = None, expert_parallel: bool = False, device: str | None = None,
                     timeout_s: float = 600.0) -> ParallelContext:
    """Join (or start) the process group and return this rank's context.

    Under ``torchrun`` nothing needs passing: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT are read
    from the environment (``env://``). Backend: NCCL when CUDA is present, gloo otherwise. CUDA ranks take GPU
    LOCAL_RANK (one GPU per rank)."""
    rank = int(os.environ.get("RANK", 0)) if rank is None else rank
    world_size = int(os.environ.get("WORLD_SIZE", 1)) if world_size is None else world_size
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if device is None:
        device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = backend or ("nccl" if device.type == "cuda" else "gloo")
    if not dist.is_initialized():
        if init_method is None and "MASTER_ADDR" not in os.environ:
            raise ParallelError("no rendezvous: pass init_method='tcp://host:port' or set MASTER_ADDR/MASTER_PORT "
                                "(torchrun sets them)")
        kw = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(backend, init_method=init_method or "env://", rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=timeout_s), **kw)
    elif dist.get_world_size() != world_size or dist.get_rank() != rank:
        raise ParallelError(f"a process group already exists as rank {dist.get_rank()} of "
                            f"{dist.get_world_size()}, not {rank} of {world_size}")
    return ParallelContext(rank, world_size, None, expert_parallel, device)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
