"""Arrival counters: a kernel whose programs each produce a partial result lets the last program of a group sum
the group's partials, instead of a second, summing launch.

Each program stores its partial, then ``arrive_last`` counts it in on the group's counter; the program that
arrives last sees every other program's partial (read them with ``cache_modifier=".cg"``: they were written by
other SMs) and resets the counter to zero. The counters are zero at rest, so consecutive kernels on one stream
and CUDA-graph replays share one buffer per device. Kernels on several streams at once must not share it: the
engine runs them on one stream.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

_COUNTERS: dict[torch.device, torch.Tensor] = {}


def arrival_counters(device: torch.device, groups: int) -> torch.Tensor:
    """At least ``groups`` int32 counters, zero. Grown when a kernel needs more; the first (eager, warm-up) calls
    allocate it, before a CUDA graph captures a launch that uses it."""
    buf = _COUNTERS.get(device)
    if buf is None or buf.numel() < groups:
        buf = torch.zeros(max(groups, 8192), dtype=torch.int32, device=device)
        _COUNTERS[device] = buf
    return buf


@triton.jit
def arrive_last(cnt_ptr, total):
    """True in the last of ``total`` programs to call this on ``cnt_ptr`` (any integer counter, zero at rest;
    after each has stored its partial); that program then sees every partial. Resets the counter."""
    tl.debug_barrier()  # every thread's stores are issued before the release below
    last = tl.atomic_add(cnt_ptr, 1, sem="acq_rel") == total - 1
    if last:
        tl.store(cnt_ptr, 0)
    return last
