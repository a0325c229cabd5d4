"""HA restart: a domain whose host failed is started again on a healthy host, once.

A domain created with ``on_host_failure = "restart"`` has an HA record in
etcd (``ha/<name>``, no lease) beside its ownership key (bound to its host's
lease). Its owner removes both when the domain ends on purpose. The
ownership key vanishing while the record stays means one thing: the owner's
lease expired. Its fencer therefore stopped the domain before that moment,
and nothing runs it now.

Every host checks for such orphans every ``lease_ttl / 2`` seconds. The
healthy host with the most free memory tries at once; the others wait two
TTLs more, in case it cannot. The restart is one transaction: the ownership
key must still be absent and the record unchanged since it was read, so one
host wins and no other can. A restart that fails leaves the record
``failed``, and nobody retries: an operator looks, then `ferry create`
arms it again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from ferry.cluster.etcd import Compare, Entry, Put
from ferry.cluster.keys import decode, encode
from ferry.cluster.lease import LeaseState
from ferry.daemon.cluster_member import ClusterMember
from ferry.daemon.lifecycle import Lifecycle
from ferry.domain.config import DomainConfig
from ferry.errors import ClusterError, FerryError
from ferry.util.tasks import spawn

log = logging.getLogger("ferryd")


class HaRestarts:
    def __init__(self, member: ClusterMember, lifecycle: Lifecycle) -> None:
        self.member = member
        self.lifecycle = lifecycle
        self.host = member.cfg.name
        self.keys = self.member.keys
        self.period = self.member.cfg.cluster.lease_ttl / 2
        self.orphaned_since: dict[str, float] = {}
        self.restarted: list[dict[str, Any]] = []  # what this host restarted (tests, logs)
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = spawn(self._loop(), "HA restarts")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.period)
            if self.member.lease.state is not LeaseState.HELD:
                continue
            try:
                await self.check()
            except ClusterError as err:
                log.warning("HA check: %s", err)

    async def check(self) -> None:
        records = await self.member.etcd.get_prefix(self.keys.has)
        if not records:
            self.orphaned_since.clear()
            return
        owned = {
            self.keys.name_of(e.key, self.keys.domains)
            for e in await self.member.etcd.get_prefix(self.keys.domains)
        }
        hosts = await self.member.hosts()
        now = time.monotonic()
        seen = set()
        for entry in records:
            name = self.keys.name_of(entry.key, self.keys.has)
            record = decode(entry.value, entry.key)
            if name in owned or record.get("state") != "armed":
                continue
            seen.add(name)
            first = self.orphaned_since.setdefault(name, now)
            mib = int(record.get("config", {}).get("memory", 0))
            rank = _ranking(hosts, mib)
            if not rank or self.host not in rank:
                continue
            mine_first = rank[0] == self.host
            if mine_first or now - first > 2 * self.member.cfg.cluster.lease_ttl + self.period:
                await self.restart(name, entry, record)
        self.orphaned_since = {k: v for k, v in self.orphaned_since.items() if k in seen}

    async def restart(self, name: str, entry: Entry, record: dict[str, Any]) -> bool:
        """Win the restart in etcd, then start the domain here; False if another host won."""
        mapping = record.get("config")
        if not isinstance(mapping, dict):
            log.error("HA record of %s has no config; not restarted", name)
            return False
        try:
            cfg = DomainConfig.from_mapping(mapping, f"HA record of {name}")
            launcher = self.lifecycle.launcher
            disks = launcher.owned_disks(cfg)
            restarts = int(record.get("restarts", 0)) + 1
            restarting = {**record, "state": "restarting", "by": self.host,
                          "restarts": restarts, "at": round(time.time(), 3)}  # fmt: skip
            await launcher.ownership.take(
                name, disks,
                also=[Put(entry.key, encode(restarting))],
                guard=[Compare.unchanged(entry)],
            )  # fmt: skip
        except ClusterError as err:
            log.info("HA restart of %s: another host won or it changed (%s)", name, err)
            return False
        except FerryError as err:
            # Its config cannot be honoured here (a disk gone, a bad record): that is
            # the one attempt. Marked so, unless the record changed meanwhile.
            log.error("HA restart of %s cannot begin: %s; marked failed", name, err)
            failed = {**record, "state": "failed", "by": self.host, "error": str(err),
                      "at": round(time.time(), 3)}  # fmt: skip
            await self.member.etcd.txn([Compare.unchanged(entry)], [Put(entry.key, encode(failed))])
            return False
        log.warning("HA: domain %s lost its host; restarting it here (restart %d)", name, restarts)
        try:
            await self.lifecycle.create(mapping, ha_restart=True)
        except FerryError as err:
            log.error("HA restart of %s failed: %s; marked failed, no host retries it", name, err)
            await launcher.ownership.release(name, disks)
            failed = {**restarting, "state": "failed", "error": str(err)}
            await self.member.etcd.txn([], [Put(entry.key, encode(failed))])
            return False
        armed = launcher.ownership.arm_ha(mapping, restarts=restarts)
        await self.member.etcd.txn([], armed)
        self.restarted.append({"name": name, "restarts": restarts, "at": time.time()})
        return True


def _ranking(hosts: list[dict[str, Any]], mib: int) -> list[str]:
    """Healthy hosts out of maintenance with room for ``mib``, most free memory first."""
    usable = [
        h for h in hosts
        if h.get("health") == "up" and not h.get("maintenance")
        and int(h.get("free_mib") or 0) >= mib
    ]  # fmt: skip
    return [str(h["host"]) for h in sorted(usable, key=lambda h: (-int(h["free_mib"]), h["host"]))]
