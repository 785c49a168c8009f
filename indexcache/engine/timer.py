"""Per-section time of the engine's forward passes (benchmarks switch it on through ``ModelRunner.timer``)."""
from __future__ import annotations

import time
from contextlib import contextmanager, nullcontext

import torch


class Timer:
    """Per-section GPU (CUDA events) or CPU time, summed over a run; off unless the benchmark switches it on."""

    def __init__(self, cuda: bool):
        self.cuda, self.events, self.cpu = cuda, [], {}

    @contextmanager
    def section(self, name: str):
        if self.cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            yield
            b.record()
            self.events.append((name, a, b))
        else:
            t = time.perf_counter()
            yield
            self.cpu[name] = self.cpu.get(name, 0.0) + (time.perf_counter() - t) * 1e3

    def summary_ms(self) -> dict:
        if self.cuda:
            torch.cuda.synchronize()
            for name, a, b in self.events:
                self.cpu[name] = self.cpu.get(name, 0.0) + a.elapsed_time(b)
            self.events = []
        return dict(self.cpu)


def section(timer: Timer | None, name: str):
    """``timer.section(name)``, or nothing when timing is off."""
    return timer.section(name) if timer is not None else nullcontext()
