"""A dependency-free progress bar on stderr (stdout stays clean for tables and ``--json``)."""
from __future__ import annotations

import sys
import time


class Progress:
    """``Progress(total, "label")``; ``update(n=1, **postfix)``; ``close()``.

    Redraws at most ~10 times a second; silent when ``enabled`` is False.
    """

    def __init__(self, total: int, label: str = "", *, enabled: bool = True, width: int = 24):
        self.total, self.label, self.enabled, self.width = max(total, 1), label, enabled, width
        self.n, self._t0, self._last = 0, time.perf_counter(), 0.0
        self._draw()

    def update(self, n: int = 1, **postfix) -> None:
        self.n += n
        now = time.perf_counter()
        if now - self._last > 0.1 or self.n >= self.total:
            self._draw(postfix)

    def _draw(self, postfix=None) -> None:
        if not self.enabled:
            return
        self._last = time.perf_counter()
        done = int(self.width * self.n / self.total)
        bar = "#" * done + "." * (self.width - done)
        el = self._last - self._t0
        extra = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                         for k, v in (postfix or {}).items())
        sys.stderr.write(f"\r{self.label} [{bar}] {self.n}/{self.total} {el:5.1f}s {extra}")
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")
            sys.stderr.flush()
