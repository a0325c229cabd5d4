"""Where a migration's time goes: named steps, each timed from the end of the one before."""

from __future__ import annotations

import time


class Timeline:
    """Consecutive steps on the monotonic clock, in milliseconds (the ``--json`` ``steps_ms``)."""

    def __init__(self) -> None:
        self._last = time.monotonic()
        self.steps_ms: dict[str, float] = {}

    def mark(self, step: str) -> None:
        """``step`` ended now: it took the time since the previous mark."""
        now = time.monotonic()
        self.steps_ms[step] = round(self.steps_ms.get(step, 0.0) + (now - self._last) * 1000, 1)
        self._last = now
