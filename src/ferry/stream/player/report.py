"""What a watch found: the report (``ferry watch --json``) and the live status.

The JSON form is read by the lab (``ferry.lab.report``, ``ferry.lab.demo``):
its keys and their meaning do not change.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_STALLED = 4
EXIT_RECONNECTED = 8
EXIT_MISMATCH = 16
EXIT_INCOMPLETE = 32


@dataclass
class Stall:
    start_s: float
    duration_s: float
    ongoing: bool = False


@dataclass
class Outage:
    start_s: float
    gap_s: float
    buffer_s: float
    stalled: bool
    drained_after_s: float | None
    ongoing: bool = False


@dataclass
class Reconnect:
    t_s: float
    offset: int
    reason: str
    resumed: bool


@dataclass
class Status:
    """What the live status line shows; handed to ``on_status`` every sample."""

    t_s: float
    state: str  # a PlayState's value, or "reconnecting" (state.RECONNECTING)
    buffer_s: float
    played_s: float
    duration_s: float | None
    bytes_received: int
    total_bytes: int | None
    stalls: int
    stalled_s: float
    reconnects: int
    gap_s: float


@dataclass
class WatchReport:
    url: str
    buffer_seconds: float
    prebuffer_s: float
    resume_s: float
    duration_s: float | None = None
    duration_source: str = "manifest"
    expected_size: int | None = None
    expected_sha256: str | None = None
    started_at: float = 0.0
    elapsed_s: float = 0.0
    playback_started_s: float | None = None
    played_s: float = 0.0
    ended: str = "running"
    bytes_received: int = 0
    sha256: str = ""
    checksum: str = "unverified"
    stalls: list[Stall] = field(default_factory=list)
    outages: list[Outage] = field(default_factory=list)
    reconnects: int = 0
    reconnect_events: list[Reconnect] = field(default_factory=list)
    longest_gap_ms: float = 0.0
    timeline: list[tuple[float, float, int]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    error: str | None = None

    @property
    def stalled_s(self) -> float:
        return sum(s.duration_s for s in self.stalls)

    @property
    def buffer_drain_s(self) -> list[float]:
        """For each outage that emptied the buffer: seconds played from the buffer."""
        return [o.drained_after_s for o in self.outages if o.drained_after_s is not None]

    @property
    def exit_code(self) -> int:
        code = EXIT_OK
        if self.stalls:
            code |= EXIT_STALLED
        if self.reconnects or any(not r.resumed for r in self.reconnect_events):
            code |= EXIT_RECONNECTED
        if self.checksum == "mismatch":
            code |= EXIT_MISMATCH
        if self.ended in ("gave-up", "error"):
            code |= EXIT_INCOMPLETE
        return code

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["stalled_s"] = round(self.stalled_s, 3)
        data["buffer_drain_s"] = self.buffer_drain_s
        data["exit_code"] = self.exit_code
        data["timeline"] = [list(s) for s in self.timeline]
        return data

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)
