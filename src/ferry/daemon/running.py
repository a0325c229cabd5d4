"""A running domain as ferryd holds it: its record, its QEMU's monitor, its lock."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field

from qemu.qmp import EventListener

from ferry.daemon.record import DomainRecord
from ferry.domain.config import DomainConfig
from ferry.hypervisor.cmdline import BootFiles, MachinePaths
from ferry.hypervisor.monitor import Monitor
from ferry.migration.source import OutgoingMigration


@dataclass
class RunningDomain:
    record: DomainRecord
    paths: MachinePaths
    monitor: Monitor
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    watcher: asyncio.Task[None] | None = None
    ending: bool = False
    outgoing: OutgoingMigration | None = None
    # Migrated away: the disk leases now belong to the target host.
    handed_over: bool = False

    @property
    def name(self) -> str:
        return self.record.config.name


@dataclass
class Incoming:
    """A domain arriving by migration, until its commit or abort."""

    migration_id: str
    dom: RunningDomain
    token: str
    peer: str
    streaming: bool = False
    events: EventListener | None = None


BootFilesProvider = Callable[[DomainConfig], BootFiles]
