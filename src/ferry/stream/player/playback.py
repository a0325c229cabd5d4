"""The playback model: bytes in, seconds of media out, in real time."""

from __future__ import annotations

from .report import Stall
from .state import PlayEvent, PlayState, next_state


class Playback:
    """The player's buffer and clock: bytes in, seconds of media out, in real time.

    Every change of state is computed at the instant it happened (a stall begins
    exactly when the buffer reached zero), not at the next sampling tick.
    """

    def __init__(self, seconds_per_byte: float, prebuffer: float, resume: float, t0: float) -> None:
        self.spb = seconds_per_byte
        self.prebuffer = prebuffer
        self.resume = resume
        self.received = 0
        self.complete = False
        self.played = 0.0
        self.state = PlayState.PREBUFFERING
        self.t_last = t0
        self.t0 = t0
        self.started_at: float | None = None
        self.finished_at: float | None = None
        self.stall_start: float | None = None
        self.stalls: list[Stall] = []

    @property
    def received_s(self) -> float:
        return self.received * self.spb

    def level(self) -> float:
        return max(0.0, self.received_s - self.played)

    def _go(self, event: PlayEvent) -> None:
        self.state = next_state(self.state, event)

    def advance(self, now: float) -> None:
        if self.state == PlayState.PLAYING and now > self.t_last:
            available = self.received_s - self.played
            elapsed = now - self.t_last
            if elapsed >= available:
                self.played += max(0.0, available)
                empty_at = self.t_last + max(0.0, available)
                if self.complete:
                    self._go(PlayEvent.END)
                    self.finished_at = empty_at
                else:
                    self._go(PlayEvent.RUN_DRY)
                    self.stall_start = empty_at
            else:
                self.played += elapsed
        self.t_last = max(self.t_last, now)

    def add(self, now: float, nbytes: int, complete: bool) -> None:
        self.advance(now)
        self.received += nbytes
        self.complete = self.complete or complete
        self._maybe_play(now)

    def mark_complete(self, now: float) -> None:
        self.advance(now)
        self.complete = True
        self._maybe_play(now)

    def _maybe_play(self, now: float) -> None:
        level = self.level()
        if self.state == PlayState.PREBUFFERING and (level >= self.prebuffer or self.complete):
            self._go(PlayEvent.START)
            self.started_at = now
        elif self.state == PlayState.STALLED and (level >= self.resume or self.complete):
            assert self.stall_start is not None
            self.stalls.append(Stall(self.stall_start - self.t0, now - self.stall_start))
            self.stall_start = None
            self._go(PlayEvent.RESUME)
        if self.state == PlayState.PLAYING and self.complete and level <= 0:
            self._go(PlayEvent.END)
            self.finished_at = now

    def close(self, now: float) -> None:
        """End of the watch: a stall still going on is recorded up to ``now``."""
        self.advance(now)
        if self.state == PlayState.STALLED and self.stall_start is not None:
            self.stalls.append(
                Stall(self.stall_start - self.t0, now - self.stall_start, ongoing=True)
            )
            self.stall_start = None

    def stalled_since(self, since: float, until: float) -> float | None:
        """When the first stall that began in [since, until] began, if any."""
        starts = [s.start_s + self.t0 for s in self.stalls]
        if self.stall_start is not None:
            starts.append(self.stall_start)
        hits = [s for s in starts if since - 1e-9 <= s <= until]
        return min(hits) if hits else None
