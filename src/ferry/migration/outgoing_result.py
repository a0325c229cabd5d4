"""What an outgoing migration reports: its result, and the times it reads from QEMU's events."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class OutgoingResult:
    migration_id: str
    target: str
    total_s: float
    transfer_s: float
    qemu_downtime_ms: int | None
    switchover_ms: float | None  # source STOP to target RESUME (QMP event times)
    commit_ms: float | None  # target stream complete -> its RESUME: what the commit costs
    bytes_sent: int
    passes: int
    resumed: bool
    stopped_at: float | None  # wall clock of the source's STOP event
    resumed_at: float | None  # wall clock of the target's RESUME event
    downtime_limit_ms: int
    # The stream's encryption as the source QEMU reports it: "tls" or "none".
    stream: str
    # multifd channels (1: one stream) and their compression, and why.
    channels: int = 1
    compression: str = "none"
    stream_plan: str = ""
    tuned_channels: int = 0  # multifd sockets given the low-water mark
    # Post-copy (opted into): the phase after the switch, and the pages the
    # running target had to ask for (each one a guest stall on the target).
    postcopy: bool = False
    postcopy_s: float | None = None
    postcopy_requests: int | None = None
    # What the convergence policy did, in order (ferry.migration.convergence).
    decisions: list[dict[str, Any]] = field(default_factory=list)
    throttle_pct: int = 0  # auto-converge's vCPU throttle at the end
    # --copy-storage: the disks' bytes copied, the time until every mirror had
    # caught up, and the last blocks' copy while the VM was stopped.
    disk_bytes: int = 0
    disk_copy_s: float | None = None
    disk_final_ms: float | None = None
    # After the source's STOP, when QEMU reported each stream status (its
    # own clock): where a switchover's time goes.
    switch_trace_ms: dict[str, float] = field(default_factory=dict)
    # Each step on the source's clock, and the target's prepare split its way.
    steps_ms: dict[str, float] = field(default_factory=dict)
    target_steps_ms: dict[str, float] = field(default_factory=dict)

    def to_wire(self) -> dict[str, Any]:
        return dict(self.__dict__)


def last_event_time(events: Any, name: str) -> float | None:
    found = None
    for event in events.history:
        if event["event"] == name:
            stamp = event["timestamp"]
            found = stamp["seconds"] + stamp["microseconds"] / 1e6
    return found


def after_stop(events: Any, stop_ts: float | None) -> dict[str, float]:
    """Each MIGRATION status QEMU reported after the STOP, in ms after it."""
    if stop_ts is None:
        return {}
    trace = {}
    for event in events.history:
        stamp = event["timestamp"]
        when = stamp["seconds"] + stamp["microseconds"] / 1e6
        if event["event"] == "MIGRATION" and when >= stop_ts:
            trace[str(event["data"].get("status"))] = round((when - stop_ts) * 1000, 1)
    return trace
