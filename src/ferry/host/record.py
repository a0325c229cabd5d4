"""A domain's record in the state directory: what ferryd needs to find it again."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ferry.cluster.ownership import MoveTicket
from ferry.domain.config import DomainConfig
from ferry.domain.state import DomainState
from ferry.errors import FerryError
from ferry.storage.new_disk import MadeDisk


@dataclass
class DomainRecord:
    config: DomainConfig
    domid: int
    state: DomainState
    started_at: float  # wall clock, for uptime
    taps: list[str]
    accel: str
    pid: int | None = None
    # The record's directory under domains/ (and its run directory): the name,
    # or name@<migration> for an incoming copy, which may briefly share its
    # name with the outgoing domain when a host migrates to itself.
    key: str = ""
    migration_id: str | None = None
    migration_target: str | None = None  # host:port of an outgoing migration
    # Whether the domain ran when its outgoing migration began: what a rollback
    # restores. A domain paused before the migration stays paused after it.
    migration_was_running: bool = False
    leases: list[str] = field(default_factory=list)
    # Disk ids this host owns for the domain in the cluster store (cluster.keys).
    owned_disks: list[str] = field(default_factory=list)
    # An arriving domain: the source host that owned it, and the revision of
    # its ownership key when prepared (what the commit transaction compares).
    migration_source: str | None = None
    move_revision: int = 0
    # Disks this host made for an arriving --copy-storage migration: removed
    # if it aborts, the domain's own once it commits (the list is then emptied).
    created_disks: list[MadeDisk] = field(default_factory=list)
    # Disks an outgoing --copy-storage migration copies: once it is handed
    # over, the stale files left here get leases naming the target.
    copied_away: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.key:
            self.key = self.config.name

    def to_json(self) -> dict[str, Any]:
        return {
            "config": self.config.to_mapping(),
            "domid": self.domid,
            "state": self.state.value,
            "started_at": self.started_at,
            "taps": self.taps,
            "accel": self.accel,
            "pid": self.pid,
            "key": self.key,
            "migration_id": self.migration_id,
            "migration_target": self.migration_target,
            "migration_was_running": self.migration_was_running,
            "leases": self.leases,
            "owned_disks": self.owned_disks,
            "migration_source": self.migration_source,
            "move_revision": self.move_revision,
            "created_disks": [d.to_json() for d in self.created_disks],
            "copied_away": self.copied_away,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any], source: str) -> DomainRecord:
        try:
            return cls(
                config=DomainConfig.from_mapping(data["config"], source),
                domid=int(data["domid"]),
                state=DomainState(data["state"]),
                started_at=float(data["started_at"]),
                taps=[str(t) for t in data["taps"]],
                accel=str(data["accel"]),
                pid=None if data.get("pid") is None else int(data["pid"]),
                key=str(data.get("key") or data["config"]["name"]),
                migration_id=data.get("migration_id"),
                migration_target=data.get("migration_target"),
                migration_was_running=bool(data.get("migration_was_running", False)),
                leases=[str(x) for x in data.get("leases", [])],
                owned_disks=[str(x) for x in data.get("owned_disks", [])],
                migration_source=data.get("migration_source"),
                move_revision=int(data.get("move_revision", 0)),
                created_disks=[MadeDisk.from_json(x) for x in data.get("created_disks", [])],
                copied_away=[str(x) for x in data.get("copied_away", [])],
            )
        except (KeyError, TypeError, ValueError) as err:
            raise FerryError(f"{source}: damaged domain record: {err}") from err

    def move_ticket(self) -> MoveTicket:
        """What the target checked at prepare, for the commit (or abort) in the store."""
        return MoveTicket(
            self.config.name,
            self.migration_source or "",
            tuple(self.owned_disks),
            self.move_revision,
        )

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        with tmp.open("w") as f:
            json.dump(self.to_json(), f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(path)


def load_record(path: Path) -> DomainRecord:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise FerryError(f"{path}: unreadable domain record: {err}") from err
    if not isinstance(data, dict):
        raise FerryError(f"{path}: damaged domain record: not an object")
    return DomainRecord.from_json(data, str(path))
