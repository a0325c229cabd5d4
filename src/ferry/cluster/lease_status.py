"""The host lease as its holder (the fencer process) tells it to ferryd: one small file.

The fencer rewrites it (atomically) on every change and renewal. Times are on
``CLOCK_MONOTONIC``, which every process of one boot shares, so ferryd can
judge the deadline itself: a fencer that hangs or dies stops updating the file,
and its ``valid_until`` passes. ferryd then takes nothing new, whatever the
last state written said.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ferry.cluster.lease import LeaseState
from ferry.hypervisor import process


@dataclass
class LeaseStatus:
    pid: int
    lease_id: int
    state: str  # a LeaseState value
    valid_until: float  # CLOCK_MONOTONIC seconds
    margin: float
    ttl: int
    # PIDs of the QEMUs the fencer has stopped (SIGSTOP) and not yet let go on.
    stopped: list[int] = field(default_factory=list)
    # What fencing did, newest last (at most a few dozen).
    events: list[dict[str, object]] = field(default_factory=list)
    # Counts for the metrics, kept across fencer restarts of one boot:
    # renewals by result ("ok", "failed") and fencing events by kind.
    renewals: dict[str, int] = field(default_factory=dict)
    event_counts: dict[str, int] = field(default_factory=dict)

    def write(self, path: Path) -> None:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(asdict(self)))
        tmp.replace(path)

    @classmethod
    def read(cls, path: Path) -> LeaseStatus | None:
        try:
            data = json.loads(path.read_text())
            return cls(**data)
        except (OSError, ValueError, TypeError):
            return None


class LeaseView:
    """ferryd's view of the lease: what ownership needs (``id``, ``state``)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def status(self) -> LeaseStatus | None:
        return LeaseStatus.read(self.path)

    @property
    def id(self) -> int:
        status = self.status()
        return status.lease_id if status else 0

    @property
    def state(self) -> LeaseState:
        """HELD only while the holder says so *and* the deadline has not come."""
        status = self.status()
        if status is None or not process.is_alive(status.pid):
            return LeaseState.LOST
        left = status.valid_until - time.monotonic()
        written = LeaseState(status.state)
        if left <= 0:
            return LeaseState.LOST
        if left <= status.margin and written is not LeaseState.LOST:
            return LeaseState.EXPIRING
        return written

    def remaining(self) -> float:
        status = self.status()
        return max(0.0, status.valid_until - time.monotonic()) if status else 0.0
