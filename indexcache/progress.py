"""A minimal progress bar on stderr (no extra dependency); silent when stderr is not a terminal unless forced."""
from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, total: int, desc: str, unit: str = "", enabled: bool | None = None):
        self.total, self.desc, self.unit, self.n = max(total, 1), desc, unit, 0
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self.start = time.perf_counter()
        self._last = 0.0

    def update(self, n: int = 1, note: str = "") -> None:
        self.n += n
        now = time.perf_counter()
        if self.enabled and (now - self._last > 0.1 or self.n >= self.total):
            self._last = now
            frac = min(self.n / self.total, 1.0)
            bar = "#" * int(frac * 30)
            rate = self.n / max(now - self.start, 1e-9)
            sys.stderr.write(f"\r{self.desc} [{bar:<30}] {self.n}/{self.total}{self.unit} {rate:.1f}/s {note}  ")
            sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write(f"\r{self.desc}: {self.n}/{self.total}{self.unit} in "
                             f"{time.perf_counter() - self.start:.1f}s" + " " * 30 + "\n")
            sys.stderr.flush()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
