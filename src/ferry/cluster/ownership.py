"""Who runs which domain and writes which disk: taken, moved and given up in transactions.

``EtcdOwnership`` is the cluster's one truth: a host may start a domain only
after one transaction made the domain and every disk it writes its own, and a
migration's commit point is the transaction that moves them from source to
target. ``LocalOwnership`` is a standalone host's: nothing is shared, the
domain table and the disk lease files are all there is (and
``ferry host list`` says so).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from ferry.cluster.etcd import Compare, Delete, Entry, EtcdClient, Get, Put
from ferry.cluster.keys import Keys, decode, encode
from ferry.cluster.lease import LeaseState
from ferry.errors import ClusterError, OwnedElsewhere

log = logging.getLogger("ferryd")


@dataclass(frozen=True)
class Owner:
    host: str
    migration: str | None  # the migration that brought the domain to ``host``
    revision: int  # the domain key's mod revision when read (0: not in a store)
    lease: int = 0  # the lease the key is bound to


@dataclass(frozen=True)
class MoveTicket:
    """What the target checked at prepare: the source owned the domain at ``revision``."""

    name: str
    source: str
    disks: tuple[str, ...]
    revision: int


class LeaseHolder(Protocol):
    """The lease keys are bound to: the fencer's (``LeaseView``) or one held here."""

    @property
    def id(self) -> int: ...

    @property
    def state(self) -> LeaseState: ...


class Ownership(Protocol):
    clustered: bool

    async def take(
        self,
        name: str,
        disks: Sequence[str],
        also: Sequence[Put] = (),
        guard: Sequence[Compare] = (),
    ) -> None: ...

    def arm_ha(self, config: Mapping[str, Any], restarts: int = 0) -> list[Put]: ...

    async def release(self, name: str, disks: Sequence[str]) -> None: ...

    async def owner(self, name: str) -> Owner | None: ...

    async def expect_move(self, name: str, source: str, disks: Sequence[str]) -> MoveTicket: ...

    async def decide_move(self, ticket: MoveTicket, migration_id: str, commit: bool) -> bool: ...

    async def settle_move(self, name: str, migration_id: str) -> str | None: ...


class LocalOwnership:
    """A standalone host: this host's table is the only truth there is."""

    clustered = False

    def __init__(self, host: str) -> None:
        self.host = host

    async def take(
        self,
        name: str,
        disks: Sequence[str],
        also: Sequence[Put] = (),
        guard: Sequence[Compare] = (),
    ) -> None:
        return None

    def arm_ha(self, config: Mapping[str, Any], restarts: int = 0) -> list[Put]:
        return []  # no other host to restart it on

    async def release(self, name: str, disks: Sequence[str]) -> None:
        return None

    async def owner(self, name: str) -> Owner | None:
        return None

    async def expect_move(self, name: str, source: str, disks: Sequence[str]) -> MoveTicket:
        return MoveTicket(name, source, tuple(disks), 0)

    async def decide_move(self, ticket: MoveTicket, migration_id: str, commit: bool) -> bool:
        # The target's durable outcome file is the commit point (migration.incoming).
        return commit

    async def settle_move(self, name: str, migration_id: str) -> str | None:
        return None  # only the target can say: ask it


class EtcdOwnership:
    clustered = True

    def __init__(self, etcd: EtcdClient, keys: Keys, host: str, lease: LeaseHolder) -> None:
        self.etcd = etcd
        self.keys = keys
        self.host = host
        self.lease = lease

    def _lease_id(self, what: str) -> int:
        if self.lease.state is not LeaseState.HELD:
            raise ClusterError(
                f"cannot {what}: host {self.host} holds no valid etcd lease "
                f"({self.lease.state.value}); it takes nothing new until it does"
            )
        return self.lease.id

    def _domain_value(self, migration: str | None = None) -> bytes:
        return encode({"host": self.host, "migration": migration, "since": round(time.time(), 3)})

    def _disk_value(self, name: str) -> bytes:
        return encode({"domain": name, "host": self.host})

    async def take(
        self,
        name: str,
        disks: Sequence[str],
        also: Sequence[Put] = (),
        guard: Sequence[Compare] = (),
    ) -> None:
        """Own ``name`` and its ``disks``, all or nothing; else say who has them.

        ``also``: writes that go with it in the same transaction (its HA record);
        ``guard``: further conditions (the HA record unchanged since read).
        """
        lease = self._lease_id(f"start domain '{name}'")
        dkey = self.keys.domain(name)
        maintenance = self.keys.maintenance(self.host)
        disk_keys = [self.keys.disk(d) for d in disks]
        result = await self.etcd.txn(
            [Compare.absent(maintenance), Compare.absent(dkey),
             *(Compare.absent(k) for k in disk_keys), *guard],
            [Put(dkey, self._domain_value(), lease),
             *(Put(k, self._disk_value(name), lease) for k in disk_keys), *also],
            [Get(maintenance), Get(dkey), *(Get(k) for k in disk_keys)],
        )  # fmt: skip
        if result.succeeded:
            return
        in_maintenance, domain_entry, *disk_entries = result.found
        if self._already_mine(name, domain_entry, disk_entries):
            return  # an earlier try applied and its answer was lost
        if in_maintenance is not None:
            raise ClusterError(
                f"host {self.host} is in maintenance: it takes no new domain "
                f"(`ferry host activate {self.host}` ends it)"
            )
        if domain_entry is not None:
            held = decode(domain_entry.value, dkey)
            raise OwnedElsewhere(
                f"domain '{name}' already runs on host {held.get('host')} (etcd {dkey})"
            )
        for disk, entry in zip(disks, disk_entries, strict=True):
            if entry is not None:
                held = decode(entry.value, entry.key)
                raise OwnedElsewhere(
                    f"disk {disk} is in use by domain '{held.get('domain')}' on host "
                    f"{held.get('host')}"
                )
        raise ClusterError(f"etcd refused to give domain '{name}' to host {self.host}")

    def arm_ha(self, config: Mapping[str, Any], restarts: int = 0) -> list[Put]:
        """The HA record of a domain to restart elsewhere if this host fails (no lease:
        it outlives the host)."""
        value = {"config": dict(config), "state": "armed", "restarts": restarts,
                 "by": self.host, "at": round(time.time(), 3)}  # fmt: skip
        return [Put(self.keys.ha(str(config["name"])), encode(value))]

    def _already_mine(self, name: str, domain: Entry | None, disks: Sequence[Entry | None]) -> bool:
        if domain is None or domain.lease != self.lease.id:
            return False
        if decode(domain.value, domain.key).get("host") != self.host:
            return False
        mine = {"domain": name, "host": self.host}
        return all(d is not None and decode(d.value, d.key) == mine for d in disks)

    async def release(self, name: str, disks: Sequence[str]) -> None:
        """Give ``name`` and its disks up, if this host still owns them.

        Its HA record goes too: a domain its owner ended is not to be restarted.
        A host whose lease expired owns nothing any more, so the record stays,
        and another host restarts the domain.
        """
        dkey = self.keys.domain(name)
        entry = await self.etcd.get(dkey)
        if entry is None or decode(entry.value, dkey).get("host") != self.host:
            return
        await self.etcd.txn(
            [Compare.unchanged(entry)],
            [Delete(dkey), *(Delete(self.keys.disk(d)) for d in disks), Delete(self.keys.ha(name))],
        )

    async def set_maintenance(self, host: str, on: bool, by: str) -> None:
        """Put ``host`` in maintenance (no new domain there) or take it out."""
        key = self.keys.maintenance(host)
        op = Put(key, encode({"since": round(time.time(), 3), "by": by})) if on else Delete(key)
        await self.etcd.txn([], [op])

    async def forget(self, name: str) -> bool:
        """Give up ``name`` and every disk key naming it here, found by reading them all.

        For a domain this host no longer runs but whose keys it still holds (a
        reboot within the TTL): its disks are not known any more.
        """
        dkey = self.keys.domain(name)
        entry = await self.etcd.get(dkey)
        if entry is None or decode(entry.value, dkey).get("host") != self.host:
            return False
        mine = [
            d.key
            for d in await self.etcd.get_prefix(self.keys.disk(""))
            if decode(d.value, d.key) == {"domain": name, "host": self.host}
        ]
        await self.etcd.txn([Compare.unchanged(entry)], [Delete(dkey), *(Delete(k) for k in mine)])
        return True

    async def owner(self, name: str) -> Owner | None:
        dkey = self.keys.domain(name)
        entry = await self.etcd.get(dkey)
        if entry is None:
            return None
        value = decode(entry.value, dkey)
        migration = value.get("migration")
        return Owner(
            str(value.get("host")),
            migration if isinstance(migration, str) else None,
            entry.mod_revision,
            entry.lease,
        )

    async def rebind(self, name: str, disks: Sequence[str]) -> bool:
        """Bind this host's keys of ``name`` to its current lease (they were under an
        older one, which would expire with them while the domain runs here)."""
        lease = self._lease_id(f"keep domain '{name}'")
        dkey = self.keys.domain(name)
        entry = await self.etcd.get(dkey)
        if entry is None or decode(entry.value, dkey).get("host") != self.host:
            return False
        result = await self.etcd.txn(
            [Compare.unchanged(entry)],
            [Put(dkey, entry.value, lease),
             *(Put(self.keys.disk(d), self._disk_value(name), lease) for d in disks)],
        )  # fmt: skip
        return result.succeeded

    async def expect_move(self, name: str, source: str, disks: Sequence[str]) -> MoveTicket:
        """At prepare, on the target: the source must own the domain and its disks."""
        self._lease_id(f"receive domain '{name}'")
        if await self.etcd.get(self.keys.maintenance(self.host)) is not None:
            raise ClusterError(f"host {self.host} is in maintenance: it takes no new domain")
        dkey = self.keys.domain(name)
        entry = await self.etcd.get(dkey)
        if entry is None:
            raise OwnedElsewhere(f"domain '{name}' is not owned by {source} in etcd ({dkey})")
        held = decode(entry.value, dkey).get("host")
        if held != source:
            raise OwnedElsewhere(f"domain '{name}' is owned by host {held}, not by {source}")
        for disk in disks:
            disk_entry = await self.etcd.get(self.keys.disk(disk))
            owner = decode(disk_entry.value, disk_entry.key) if disk_entry else {}
            if owner.get("domain") != name or owner.get("host") != source:
                raise OwnedElsewhere(
                    f"disk {disk} is not held by domain '{name}' on {source} in etcd"
                )
        return MoveTicket(name, source, tuple(disks), entry.mod_revision)

    async def decide_move(self, ticket: MoveTicket, migration_id: str, commit: bool) -> bool:
        """The target's decision, made in etcd; True if the domain is this host's now.

        ``commit``: the commit point, domain and disks become this host's if
        they are still the source's as checked at prepare. Not ``commit``: the
        source's key is rewritten as it is, so that no commit sent earlier (and
        whose answer was lost) can apply any more. Safe to retry: a decision
        applied once moves the key's revision on, and a retry only reads it.
        """
        dkey = self.keys.domain(ticket.name)
        if commit:
            lease = self._lease_id(f"commit domain '{ticket.name}'")
            ops: list[Put] = [
                Put(dkey, self._domain_value(migration_id), lease),
                *(Put(self.keys.disk(d), self._disk_value(ticket.name), lease)
                  for d in ticket.disks),
            ]  # fmt: skip
        else:
            entry = await self.etcd.get(dkey)
            if entry is None or entry.mod_revision != ticket.revision:
                return self._won(entry, migration_id)
            ops = [Put(dkey, entry.value, entry.lease)]
        result = await self.etcd.txn(
            [Compare(dkey, "mod", "==", ticket.revision)], ops, [Get(dkey)]
        )
        return commit if result.succeeded else self._won(result.found[0], migration_id)

    def _won(self, entry: Entry | None, migration_id: str) -> bool:
        """Whether ``entry`` says this host won the domain by ``migration_id``."""
        if entry is None:
            return False
        value = decode(entry.value, entry.key)
        return value.get("host") == self.host and value.get("migration") == migration_id

    async def settle_move(self, name: str, migration_id: str) -> str | None:
        """On the source, commit answer lost: ``committed``, ``aborted`` or ``unowned``.

        If the target has not committed yet, rewriting our own key makes its
        commit fail for good: the migration is then aborted, decided in etcd
        without the target's word.
        """
        dkey = self.keys.domain(name)
        entry = await self.etcd.get(dkey)
        if entry is None:
            return "unowned"
        value = decode(entry.value, dkey)
        if value.get("host") != self.host and value.get("migration") == migration_id:
            return "committed"
        if value.get("host") != self.host:
            return "unowned"
        lease = self._lease_id(f"take domain '{name}' back")
        result = await self.etcd.txn(
            [Compare.unchanged(entry)],
            [Put(dkey, entry.value, lease)],
        )
        return "aborted" if result.succeeded else await self.settle_move(name, migration_id)
