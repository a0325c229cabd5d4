"""This host as a member of the cluster: its fencer, its ownership, what it publishes.

ferryd does not hold the etcd lease itself: the fencer process does
(``daemon.fencer``), so that the lease, and the fencing of this host's QEMUs,
do not depend on ferryd being alive. ferryd starts the fencer when none runs,
starts it again if it dies, and reads its status file for the lease's id and
state (``cluster.lease_status``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from ferry import __version__
from ferry.cluster import view
from ferry.cluster.etcd import EtcdClient, Put, parse_endpoints
from ferry.cluster.keys import Keys, encode
from ferry.cluster.lease import LeaseState
from ferry.cluster.lease_status import LeaseView
from ferry.cluster.ownership import EtcdOwnership
from ferry.config.host import HostConfig
from ferry.daemon.fencer import fencer_files
from ferry.domain.state import DomainState
from ferry.errors import ClusterError, ConfigError, FerryError, OwnedElsewhere
from ferry.host.launcher import Launcher
from ferry.host.layout import HostLayout
from ferry.host.table import DomainTable
from ferry.hypervisor import process
from ferry.pki.credentials import Credentials
from ferry.util.tasks import spawn
from ferry.util.wait import wait_until

log = logging.getLogger("ferryd")

PUBLISH_EVERY_S = 5.0


def cluster_name(cfg: HostConfig, credentials: Credentials | None) -> str:
    if credentials is None:
        return cfg.cluster.name or "ferry"
    name = credentials.identity.cluster
    if cfg.cluster.name and cfg.cluster.name != name:
        raise ConfigError(
            f"[cluster] name = {cfg.cluster.name!r}, but this host's certificate is of "
            f"cluster {name!r}"
        )
    return name


class ClusterMember:
    def __init__(self, cfg: HostConfig, layout: HostLayout, credentials: Credentials | None):
        endpoints = parse_endpoints(cfg.cluster.etcd, "[cluster] etcd")
        if not endpoints[0].tls and not cfg.insecure:
            raise ConfigError(
                "[cluster] etcd: http:// endpoints carry ownership in clear; use https:// "
                "(or insecure = true)"
            )
        self.cfg = cfg
        self.layout = layout
        self.credentials = credentials
        self.keys = Keys(cluster_name(cfg, credentials))
        self.etcd = EtcdClient(endpoints, credentials, timeout=cfg.cluster.lease_ttl / 4)
        self.files = fencer_files(layout.run_dir)
        self.lease = LeaseView(self.files["status"])
        self.ownership = EtcdOwnership(self.etcd, self.keys, cfg.name, self.lease)
        self.fencer_pid: int | None = None
        # Where other hosts reach this one's relocation server (the one bound).
        self.relocation_port = cfg.relocation.port
        self._tasks: list[asyncio.Task[None]] = []
        self._table: DomainTable | None = None
        self._launcher: Launcher | None = None

    # -- the fencer ------------------------------------------------------------

    def _running_fencer(self) -> int | None:
        try:
            pid = int(self.files["pid"].read_text())
        except (OSError, ValueError):
            return None
        marker = str(self.layout.run_dir).encode()
        alive = process.processes(b"ferry.daemon.fencer", marker)
        return pid if pid in alive else None

    def _spawn_fencer(self) -> int:
        args = [
            sys.executable, "-m", "ferry.daemon.fencer",
            "--run-dir", str(self.layout.run_dir), "--ttl", str(self.cfg.cluster.lease_ttl),
        ]  # fmt: skip
        for url in self.cfg.cluster.etcd:
            args += ["--etcd", url]
        if self.credentials is not None:
            args += ["--pki-dir", str(self.credentials.dir)]
        log_file = self.layout.state_dir / "fencer.log"
        with log_file.open("ab") as out:
            proc = subprocess.Popen(
                args, stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True
            )
        log.info("started the fencer (pid %d, log %s)", proc.pid, log_file)
        return proc.pid

    async def ensure_fencer(self) -> None:
        pid = self._running_fencer()
        if pid is None:
            pid = self._spawn_fencer()
        self.fencer_pid = pid
        try:
            await wait_until(
                lambda: self.lease.state is LeaseState.HELD,
                timeout=2.0 * self.cfg.cluster.lease_ttl,
                what="the fencer to hold an etcd lease",
            )
        except FerryError:
            log.error(
                "no etcd lease yet (%s): this host takes no domain until it holds one",
                self.etcd.describe(),
            )

    async def _supervise(self) -> None:
        while True:
            pid = self.fencer_pid
            if pid is not None and not await process.wait_exit(pid, 3600):
                continue
            log.error("the fencer (pid %s) ended; starting it again", pid)
            await asyncio.sleep(1.0)  # at most one start a second, should it keep failing
            self.fencer_pid = self._spawn_fencer()

    async def stop_fencer(self) -> None:
        """Only for a host leaving the cluster (and tests): its lease is left to expire."""
        pid = self._running_fencer() or self.fencer_pid
        if pid is not None:
            await process.terminate(pid, 10.0)

    # -- this host's domains -----------------------------------------------------

    async def start(self, table: DomainTable, launcher: Launcher) -> None:
        self._table, self._launcher = table, launcher
        if self.fencer_pid is None:  # ferryd's start ensured it before re-attaching
            await self.ensure_fencer()
        self._tasks = [
            spawn(self._supervise(), "fencer supervision"),
            spawn(self._publish_loop(), "publish this host in etcd"),
        ]

    async def adopt(self) -> None:
        """The domains running here are owned here, or the cluster learns of them now.

        Keys naming this host for a domain no longer here are given up. A
        domain that etcd gives to another host is stopped here, never resumed
        by ferry: two copies must never both run.
        """
        assert self._table is not None and self._launcher is not None
        # As create and prepare do: nothing is claimed halfway while we look.
        async with self._table.claim_lock:
            await self._adopt(self._table, self._launcher)

    async def _adopt(self, table: DomainTable, launcher: Launcher) -> None:
        here = {d.name: d for d in table.running()}
        for dom in here.values():
            if dom.record.state is DomainState.MIGRATING_OUT:
                continue  # its migration's end decides (settled in etcd)
            try:
                owner = await self.ownership.owner(dom.name)
                if owner is None:
                    disks = launcher.owned_disks(dom.record.config)
                    await self.ownership.take(dom.name, disks)
                    dom.record.owned_disks = disks
                    table.save(dom)
                    log.info("domain %s now owned by this host in etcd", dom.name)
                elif owner.host != self.cfg.name:
                    raise OwnedElsewhere(f"etcd gives domain '{dom.name}' to host {owner.host}")
                elif owner.lease != self.lease.id:
                    await self.ownership.rebind(dom.name, dom.record.owned_disks)
                    log.info("domain %s: its keys moved to this host's current lease", dom.name)
            except OwnedElsewhere as err:
                log.error("%s: stopping its copy here", err)
                with contextlib.suppress(FerryError):
                    await dom.monitor.execute("stop")
            except ClusterError as err:
                log.error("cannot adopt domain %s in etcd: %s", dom.name, err)
        for entry in await self.etcd.get_prefix(self.keys.domains):
            name = self.keys.name_of(entry.key, self.keys.domains)
            if name in here or table.arriving(name):
                continue
            if await self.ownership.forget(name):
                log.warning("etcd named this host owner of %s, which is not here: freed", name)

    # -- what the cluster sees of this host ----------------------------------------

    def record(self) -> dict[str, Any]:
        assert self._table is not None
        status = self.lease.status()
        domains = [
            {
                "name": d.name,
                "id": d.record.domid,
                "state": d.record.state.value,
                "flags": d.record.state.xm_flags,
                "mem": d.record.config.memory,
                "vcpus": d.record.config.vcpus,
            }
            for d in self._table.everyone()
        ]
        total, available = _memory_mib()
        return {
            "name": self.cfg.name,
            "address": self.cfg.relocation.address or None,
            "relocation_port": self.relocation_port,
            "control_port": self.cfg.control.port,
            "cpus": os.cpu_count(),
            "memory_mib": total,
            "free_mib": max(0, available - self._table.promised_mib()),
            "domains": domains,
            "fenced": bool(status and status.stopped),
            "lease_ttl": self.cfg.cluster.lease_ttl,
            "insecure": self.cfg.insecure,
            "version": __version__,
            "updated": round(time.time(), 3),
        }

    async def publish(self) -> None:
        if self.lease.state is not LeaseState.HELD:
            return
        key = self.keys.host(self.cfg.name)
        await self.etcd.txn([], [Put(key, encode(self.record()), self.lease.id)])

    async def _publish_loop(self) -> None:
        assert self._table is not None
        changed = self._table.changed
        adopted = False
        while True:
            try:
                if not adopted and self.lease.state is LeaseState.HELD:
                    # At start, or once a lease is held if etcd was away then.
                    await self.adopt()
                    adopted = True
                await self.publish()
            except ClusterError as err:
                log.warning("cannot publish this host in etcd: %s", err)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(PUBLISH_EVERY_S):
                    await changed.wait()
            changed.clear()

    # -- the cluster's view ------------------------------------------------------

    async def hosts(self) -> list[dict[str, Any]]:
        return await view.host_rows(self.etcd, self.keys)

    async def domains(self) -> list[dict[str, Any]]:
        return await view.domain_rows(self.etcd, self.keys)

    async def close(self) -> None:
        """ferryd stops: the fencer keeps the lease (and this host's domains owned)."""
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        await self.etcd.close()


def _memory_mib() -> tuple[int, int]:
    total = available = 0
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                total = int(line.split()[1]) // 1024
            elif line.startswith("MemAvailable:"):
                available = int(line.split()[1]) // 1024
    return total, available
