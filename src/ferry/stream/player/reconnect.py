"""When to try a broken stream again, and when to give up.

Times are handed in (monotonic seconds), never read here, so the schedule is
the same on a loaded machine as on an idle one and a test can walk it exactly.
"""

from __future__ import annotations

# The pause after the n-th failed attempt is BASE * 2**n, at most MAX: the first
# attempt follows the break at once, then 0.2, 0.4, 0.8, 1.6, 2, 2 ... seconds.
BACKOFF_BASE_S = 0.1
BACKOFF_MAX_S = 2.0


class ReconnectBudget:
    """Attempts to resume a broken stream, with backoff, within ``window`` seconds."""

    def __init__(self, window: float) -> None:
        self.window = window
        self.since: float | None = None
        self.attempt = 0

    @property
    def broken(self) -> bool:
        return self.since is not None

    def broke(self, now: float) -> None:
        """The stream broke at ``now``: the window starts."""
        self.since = now
        self.attempt = 0

    def failed(self, now: float) -> float | None:
        """An attempt failed at ``now``: the pause before the next one, or None to give up."""
        if self.since is None:
            self.since = now
        if now - self.since >= self.window:
            return None
        self.attempt += 1
        return min(BACKOFF_MAX_S, BACKOFF_BASE_S * 2.0**self.attempt)

    def resumed(self) -> None:
        self.since = None
        self.attempt = 0
