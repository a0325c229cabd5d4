"""The lifecycle requests of the control API: create, list, pause, shut down, destroy.

Every request on a domain holds that domain's lock, so two requests never
interleave on one QEMU; every state change goes through the table.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from ferry.domain.config import DomainConfig
from ferry.domain.state import DomainState, Event, next_state
from ferry.errors import DomainExists, FerryError, HypervisorError
from ferry.host.launcher import Launcher
from ferry.host.running import RunningDomain
from ferry.host.table import DomainTable
from ferry.host.watcher import DomainWatcher
from ferry.hypervisor import process
from ferry.hypervisor.guest_agent import agent_call, ipv4_addresses
from ferry.network import tap
from ferry.storage.disks import check_disks
from ferry.storage.images import pin_formats

log = logging.getLogger("ferryd")
# The guest agent answers at once or not at all (none installed, guest busy).
AGENT_TIMEOUT = 2.0
ABANDON_GRACE = 5.0
# Feeds a restored domain's QEMU its saved stream (ferry.daemon.save_restore).
Loader = Callable[[RunningDomain], Awaitable[None]]


class Lifecycle:
    def __init__(self, table: DomainTable, launcher: Launcher, watcher: DomainWatcher) -> None:
        self.table = table
        self.launcher = launcher
        self.watcher = watcher
        self.host = launcher.host

    # -- queries ---------------------------------------------------------------

    def list_rows(self) -> list[dict[str, Any]]:
        rows = []
        for dom in self.table.everyone():
            rec = dom.record
            rows.append(
                {
                    "name": rec.config.name,
                    "id": rec.domid,
                    "mem": rec.config.memory,
                    "vcpus": rec.config.vcpus,
                    "state": rec.state.value,
                    "flags": rec.state.xm_flags,
                    "time": round(process.cpu_seconds(rec.pid), 1) if rec.pid else 0.0,
                    "uptime": round(time.time() - rec.started_at, 1),
                    "pid": rec.pid,
                    "accel": rec.accel,
                    "taps": list(rec.taps),
                }
            )
        return rows

    def info(self, name: str) -> dict[str, Any]:
        dom = self.table.get(name)
        return {
            "config": dom.record.config.to_mapping(),
            "console_socket": str(dom.paths.console_socket),
            "console_log": str(dom.paths.console_log),
            "qemu_log": str(dom.paths.qemu_log),
            **next(r for r in self.list_rows() if r["id"] == dom.record.domid),
        }

    async def info_live(self, name: str) -> dict[str, Any]:
        """``info`` and what the guest's agent says: its addresses (None: no agent)."""
        info = self.info(name)
        info["addresses"] = await self.guest_addresses(self.table.get(name))
        return info

    async def list_long(self) -> list[dict[str, Any]]:
        rows = self.list_rows()
        doms = {d.record.domid: d for d in self.table.everyone()}
        found = await asyncio.gather(*(self.guest_addresses(doms[r["id"]]) for r in rows))
        return [row | {"addresses": addresses} for row, addresses in zip(rows, found, strict=True)]

    async def guest_addresses(self, dom: RunningDomain) -> list[str] | None:
        if dom.record.state is not DomainState.RUNNING:
            return None
        try:
            interfaces = await agent_call(
                dom.paths.agent_socket, "guest-network-get-interfaces", timeout=AGENT_TIMEOUT
            )
        except HypervisorError:
            return None
        return ipv4_addresses(interfaces)

    async def _agent_answers(self, dom: RunningDomain) -> bool:
        try:
            await agent_call(dom.paths.agent_socket, "guest-ping", timeout=AGENT_TIMEOUT)
        except HypervisorError:
            return False
        return True

    def console_socket(self, name: str) -> str:
        return str(self.table.get(name).paths.console_socket)

    # -- create ----------------------------------------------------------------

    async def create(
        self,
        mapping: Mapping[str, Any],
        ha_restart: bool = False,
        load: Loader | None = None,
        paused: bool = False,
    ) -> dict[str, Any]:
        """Start a domain. ``ha_restart``: its HA restart, already owned here in etcd.

        ``load``: a restore; QEMU starts waiting for a stream, and ``load`` feeds
        it and runs the domain (or, ``paused``, leaves it paused). A load that
        fails ends that QEMU and gives back what was taken for it.
        """
        cfg = DomainConfig.from_mapping(mapping, "domain config")
        async with self.table.claim_lock:
            await self.table.wait_gone(cfg.name)
            if self.table.find(cfg.name) or self.table.arriving(cfg.name):
                raise DomainExists(
                    f"cannot create domain '{cfg.name}': a domain of that name is already "
                    f"running on host {self.host.name}"
                )
            try:
                roots, servers = self.host.storage_roots, self.host.storage_servers
                in_use = self.table.disks_in_use(roots)
                check_disks(cfg, roots, in_use, servers)
                # Read once from the images, checked, then pinned: QEMU never probes.
                cfg = await pin_formats(cfg, roots, servers, in_use)
                await asyncio.to_thread(tap.check_bridges, [v.bridge for v in cfg.vifs])
                self.launcher.check_memory(cfg, self.table.promised_mib())
                boot = self.launcher.boot_files(cfg)
                accel = (await self.launcher.accel()).accel
                owned, leases = await self.launcher.claim(cfg, taken_in_store=ha_restart)
            except FerryError as err:
                raise type(err)(f"cannot create domain '{cfg.name}': {err}") from err
            record = self.launcher.new_record(cfg, accel, cfg.name, self.table.next_domid())
            record.owned_disks, record.leases = owned, leases
            try:
                dom = await self.launcher.launch(record, boot, incoming=load is not None)
            except FerryError:
                await self.launcher.release(record)
                raise
            if load is not None:
                try:
                    await load(dom)
                except BaseException:
                    await self._abandon(dom)
                    raise
            self.table.transition(dom, Event.START)
            if paused:
                self.table.transition(dom, Event.PAUSE)
            self.table.add(dom)
            self.watcher.start(dom)
        log.info("created domain %s (id %d, pid %s, %s)", cfg.name, record.domid, record.pid, accel)
        return {"name": cfg.name, "id": record.domid, "accel": accel, "ignored": list(cfg.ignored)}

    async def _abandon(self, dom: RunningDomain) -> None:
        """A QEMU launched but never a domain here: ended, its files and claims gone."""
        await dom.monitor.close()
        if dom.pid is not None:
            await process.terminate(dom.pid, ABANDON_GRACE)
        await asyncio.to_thread(self.launcher.cleanup_files, dom.record, dom.paths)
        await self.launcher.release(dom.record)

    # -- requests on a running domain -----------------------------------------

    async def pause(self, name: str) -> None:
        dom = self.table.get(name)
        async with dom.lock:
            next_state(name, dom.record.state, Event.PAUSE)
            await dom.monitor.execute("stop")
            self.table.transition(dom, Event.PAUSE)

    async def unpause(self, name: str) -> None:
        dom = self.table.get(name)
        async with dom.lock:
            next_state(name, dom.record.state, Event.UNPAUSE)
            await dom.monitor.execute("cont")
            self.table.transition(dom, Event.UNPAUSE)

    async def shutdown(self, name: str, wait: bool, timeout: float) -> dict[str, Any]:
        """Through the guest agent where it answers (no ACPI needed), else the ACPI
        power button; with ``wait``, until the guest has powered off."""
        dom = self.table.get(name)
        async with dom.lock:
            next_state(name, dom.record.state, Event.SHUTDOWN)
            if dom.record.state is DomainState.PAUSED:
                raise FerryError(
                    f"cannot shut down domain '{name}': it is paused and cannot see the "
                    "power button; unpause it or use destroy"
                )
            if await self._agent_answers(dom):
                method = "the guest agent"
                await agent_call(
                    dom.paths.agent_socket, "guest-shutdown", {"mode": "powerdown"},
                    timeout=AGENT_TIMEOUT, reply=False,
                )  # fmt: skip
            else:
                method = "the ACPI power button"
                await dom.monitor.execute("system_powerdown")
        if not wait:
            return {"ended": False, "method": method}
        if not await process.wait_exit(dom.pid, timeout):
            raise HypervisorError(
                f"domain '{name}' did not power off within {timeout:.0f} s of {method}; "
                "it is still running (use destroy to force it off)"
            )
        if dom.watcher is not None:
            await asyncio.shield(dom.watcher)
        return {"ended": True, "method": method}

    async def destroy(self, name: str) -> None:
        dom = self.table.get(name)
        async with dom.lock:
            next_state(name, dom.record.state, Event.SHUTDOWN)
            await self.launcher.end_qemu(dom)
