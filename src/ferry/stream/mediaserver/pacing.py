"""Sending media at its real-time rate, after a head start."""

from __future__ import annotations

import time
from collections.abc import Callable

from .config import Config

CHUNK_MAX = 8192
# Pacing aims at roughly this many writes per second, so progress stays smooth.
WRITES_PER_SECOND = 20


class Pacer:
    """Token bucket: ``burst`` bytes at once, then ``rate`` bytes per second.

    ``clock`` and ``sleep`` are the monotonic clock and a blocking pause; tests
    hand in their own to check the schedule without waiting for it.
    """

    def __init__(
        self,
        rate: float,
        burst: float,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.rate = rate
        self.burst = burst
        self.clock = clock
        self.sleep = sleep
        self.start = clock()
        self.sent = 0

    def chunk_size(self) -> int:
        if self.rate <= 0:
            return CHUNK_MAX * 8
        return max(512, min(CHUNK_MAX, int(self.rate / WRITES_PER_SECOND)))

    def wait(self, nbytes: int) -> None:
        """Block until ``nbytes`` more may be sent."""
        if self.rate <= 0:
            return
        due = self.start + (self.sent + nbytes - self.burst) / self.rate
        delay = due - self.clock()
        if delay > 0:
            self.sleep(delay)

    def sent_bytes(self, nbytes: int) -> None:
        self.sent += nbytes


def media_pacer(config: Config, size: int, duration: float | None) -> Pacer:
    """The pacer for a media file of ``size`` bytes that plays ``duration`` seconds.

    An unknown duration is estimated from ``--fallback-kbps``; ``--pace 0`` sends
    as fast as the client reads.
    """
    if config.pace <= 0:
        return Pacer(0.0, 0.0)
    media_rate = size / duration if duration else config.fallback_kbps * 1000.0 / 8.0
    return Pacer(media_rate * config.pace, media_rate * config.burst)
