"""Refuse a GPU benchmark within a second on a machine without a GPU, before torch is imported (importing torch
alone takes seconds). A CPU smoke run is only ever explicit: ``--device cpu``."""
from __future__ import annotations

import os
import sys


def gpu_driver_present() -> bool:
    """False when no GPU can exist here: no NVIDIA driver with a GPU, no ROCm device, or none made visible."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return False
    gpus = "/proc/driver/nvidia/gpus"
    return (os.path.isdir(gpus) and bool(os.listdir(gpus))) or os.path.exists("/dev/kfd")


def wants_cpu(argv: list[str]) -> bool:
    return "--device=cpu" in argv or any(a == "--device" and b == "cpu" for a, b in zip(argv, argv[1:]))


def require_gpu(command: str, smoke: str, argv: list[str] | None = None) -> None:
    """Exit with status 2 and a clear message unless a GPU may be present or ``--device cpu`` was asked for."""
    argv = sys.argv[1:] if argv is None else argv
    if wants_cpu(argv) or any(a in ("-h", "--help") for a in argv) or gpu_driver_present():
        return
    print(f"error: {command} times kernels on a CUDA GPU and this machine has none. "
          f"For a CPU smoke run (timings mean nothing): {smoke}", file=sys.stderr)
    raise SystemExit(2)
