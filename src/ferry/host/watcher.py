"""Watching a domain's QEMU: its events while it runs, the cleanup when it ends.

A watcher notices a QEMU that ends by itself (guest power-off, crash) and
removes the domain from the table, releases its leases and files. Cancelled,
it means ferryd is leaving: the domain lives on, untouched.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from ferry.domain.state import DomainState, Event
from ferry.errors import FerryError
from ferry.host.launcher import Launcher
from ferry.host.running import RunningDomain
from ferry.host.table import DomainTable, event_for_qemu_status
from ferry.hypervisor import process
from ferry.util.tasks import spawn

log = logging.getLogger("ferryd")


class DomainWatcher:
    def __init__(self, table: DomainTable, launcher: Launcher) -> None:
        self.table = table
        self.launcher = launcher

    def start(self, dom: RunningDomain) -> None:
        dom.watcher = spawn(self._watch(dom), f"watch {dom.record.key} pid {dom.pid}")

    async def stop(self, dom: RunningDomain) -> None:
        """Stop watching without touching the domain (ferryd is leaving)."""
        if dom.watcher is not None:
            dom.watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await dom.watcher
        await dom.monitor.close()

    async def _watch(self, dom: RunningDomain) -> None:
        events = spawn(self.follow_events(dom), f"events of {dom.record.key}")
        try:
            while not await process.wait_exit(dom.pid, 3600):
                pass
        finally:
            events.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await events
            await dom.monitor.close()
        await self._ended(dom)

    async def follow_events(self, dom: RunningDomain) -> None:
        async for event in dom.monitor.events:
            kind = event["event"]
            if kind == "GUEST_PANICKED" and dom.record.state is DomainState.RUNNING:
                await self._crashed(dom)
            elif (
                kind in ("STOP", "RESUME")
                and not dom.lock.locked()
                and dom.record.state in (DomainState.RUNNING, DomainState.PAUSED)
            ):
                # A change made behind ferryd's back (QEMU's own monitor, a
                # guest watchdog): follow it rather than contradict it.
                with contextlib.suppress(FerryError):
                    status = await dom.monitor.execute("query-status")
                    change = event_for_qemu_status(dom.record.state, status)
                    if change is not None:
                        self.table.transition(dom, change)

    async def _crashed(self, dom: RunningDomain) -> None:
        async with dom.lock:
            self.table.transition(dom, Event.CRASH)
            log.warning("domain %s crashed (on_crash=%s)", dom.name, dom.record.config.on_crash)
            if dom.record.config.on_crash == "restart":
                await dom.monitor.execute("system_reset")
                await dom.monitor.execute("cont")
                self.table.transition(dom, Event.RESTART)

    async def _ended(self, dom: RunningDomain) -> None:
        log.info("domain %s (id %d) ended", dom.name, dom.record.domid)
        self.table.discard(dom)
        if not dom.handed_over:
            await self.launcher.release(dom.record)
        await asyncio.to_thread(self.launcher.cleanup_files, dom.record, dom.paths)
