"""A running domain as ferryd holds it: its record, its QEMU's monitor, its lock."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from qemu.qmp import EventListener

from ferry.domain.config import DomainConfig
from ferry.domain.migration_state import Phase, next_phase
from ferry.host.record import DomainRecord
from ferry.hypervisor.cmdline import BootFiles, MachinePaths
from ferry.hypervisor.monitor import Monitor


@dataclass
class OutgoingControl:
    """What the rest of ferryd may see and do of an outgoing migration."""

    migration_id: str
    phase: Phase = Phase.CONNECT
    abort_requested: asyncio.Event = field(default_factory=asyncio.Event)
    # The latest progress line (rate, remaining, passes, expected downtime), for
    # whoever watches (the dashboard), not only the caller of the migration.
    progress: dict[str, Any] = field(default_factory=dict)
    started_at: float = field(default_factory=time.time)

    def advance(self, new: Phase) -> None:
        self.phase = next_phase(self.migration_id[:8], self.phase, new)


@dataclass
class RunningDomain:
    record: DomainRecord
    paths: MachinePaths
    monitor: Monitor
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    watcher: asyncio.Task[None] | None = None
    ending: bool = False
    outgoing: OutgoingControl | None = None
    # Migrated away (or never ours): the disk leases belong to another host.
    handed_over: bool = False

    @property
    def name(self) -> str:
        return self.record.config.name

    @property
    def pid(self) -> int:
        assert self.record.pid is not None, f"domain {self.name} has no QEMU"
        return self.record.pid


@dataclass
class Incoming:
    """A domain arriving by migration, until its commit or abort."""

    migration_id: str
    dom: RunningDomain
    token: str
    peer: str
    streaming: bool = False
    events: EventListener | None = None
    # The decision is being made in the cluster store: whatever happens, this
    # QEMU may not be ended until the store has answered.
    deciding: bool = False
    # The tasks that keep the arriving QEMU's ports (multifd, disk exports)
    # to the source.
    gates: list[asyncio.Task[None]] = field(default_factory=list)
    # Post-copy: the commit comes before the device state, held at the source.
    postcopy: bool = False
    # --copy-storage: the port on which its QEMU serves its new disks to the
    # source over NBD (0: none).
    exports: int = 0


BootFilesProvider = Callable[[DomainConfig], BootFiles]
