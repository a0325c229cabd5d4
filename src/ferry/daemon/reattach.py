"""Finding the QEMUs again after ferryd restarts, and settling what it left half done.

QEMU outlives ferryd. On start, every record in the state directory is
matched with its QEMU (by PID and QMP socket, so a recycled PID is not taken
for it). What the old ferryd was doing decides the rest:

- an arriving domain is kept only if its commit was written (then it runs, or
  stays paused if it was paused on the source); otherwise no commit can come
  any more, its QEMU is ended and the migration is ``aborted``;
- a departing domain whose stream had completed is in doubt: held paused
  while the target is asked; one whose stream had not completed is ours again.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from ferry.domain.migration_state import Outcome
from ferry.domain.state import DomainState, Event
from ferry.errors import FerryError, QmpError
from ferry.host.arriving_disks import discard_disks
from ferry.host.launcher import QMP_TIMEOUT, Launcher
from ferry.host.record import DomainRecord, load_record
from ferry.host.running import Incoming, RunningDomain
from ferry.host.table import DomainTable, event_for_qemu_status
from ferry.host.watcher import DomainWatcher
from ferry.hypervisor import process
from ferry.hypervisor.monitor import Monitor
from ferry.migration.arrival_waits import decide_in_store
from ferry.migration.incoming import IncomingMigrations
from ferry.migration.indoubt import SourceEnd
from ferry.migration.outgoing import OutgoingMigrations
from ferry.migration.switchover import (
    HELD,
    PAST_SWITCH,
    holds_for_commit,
    wait_migration_settled,
)
from ferry.storage.new_disk import remove_part_files

log = logging.getLogger("ferryd")

# A temporary image older than this is no disk being made (that takes seconds),
# by this host or any other sharing the storage: a crash left it.
PART_FILE_AGE_S = 3600.0


class Reattach:
    def __init__(
        self,
        table: DomainTable,
        launcher: Launcher,
        watcher: DomainWatcher,
        outgoing: OutgoingMigrations,
        end: SourceEnd,
        incoming: IncomingMigrations,
    ) -> None:
        self.incoming = incoming
        self.table = table
        self.launcher = launcher
        self.watcher = watcher
        self.outgoing = outgoing
        self.end = end

    async def all(self) -> None:
        roots = self.launcher.host.storage_roots
        for path in await asyncio.to_thread(remove_part_files, roots, PART_FILE_AGE_S):
            log.info("removed %s, a disk left half made by a ferryd that stopped", path)
        domains_dir = self.table.layout.domains_dir
        if domains_dir.exists():
            for directory in sorted(domains_dir.iterdir()):
                record_file = directory / "record.json"
                if not record_file.exists():
                    continue
                try:
                    await self._one(load_record(record_file))
                except FerryError as err:
                    log.error("cannot re-attach %s: %s", directory.name, err)
        # Prepared here, but no QEMU or record left to commit: it never will be.
        for mid in self.table.outcomes.pending():
            if self.table.incoming(mid) is None:
                self.table.decide(mid, Outcome.ABORTED)

    async def _one(self, record: DomainRecord) -> None:
        name = record.config.name
        paths = self.table.layout.machine_paths(record.key)
        pid = process.read_pidfile(paths.pidfile) or record.pid
        if pid is None or not process.is_our_qemu(pid, paths.qmp_socket):
            log.info("domain %s ended while ferryd was away; cleaning up", name)
            if record.migration_id and record.state is DomainState.MIGRATING_IN:
                await self._lost_arrival(record)
            await asyncio.to_thread(self.launcher.cleanup_files, record, paths)
            return
        record.pid = pid
        monitor = Monitor(name)
        await monitor.connect(paths.qmp_socket, QMP_TIMEOUT)
        dom = RunningDomain(record=record, paths=paths, monitor=monitor)
        if record.state is DomainState.SHUTOFF:
            # Handed over (or destroyed) just before ferryd went down: its QEMU
            # only had to end. A migration's leases are the target's now.
            log.info("domain %s was shut off here, its QEMU still running: ending it", name)
            dom.handed_over = record.migration_id is not None
            self.watcher.start(dom)
            await self.launcher.end_qemu(dom)
            return
        if record.state is DomainState.MIGRATING_IN:
            if not await self._arriving(dom):
                return
        elif record.state is DomainState.MIGRATING_OUT:
            await self._departing(dom)
        else:
            status = await monitor.execute("query-status")
            change = event_for_qemu_status(record.state, status)
            if change is not None:
                self.table.transition(dom, change)
        self.table.save(dom)
        if self.table.find(name) is None:
            self.table.add(dom)
        self.watcher.start(dom)
        log.info("re-attached domain %s (pid %d, %s)", name, pid, record.state.value)

    async def _lost_arrival(self, record: DomainRecord) -> None:
        """An arriving domain whose QEMU ended while ferryd was away: committed or not?

        In a cluster the store may have committed it (an answer the old ferryd
        never heard): then the disks made for it are the domain's, and stay.
        """
        mid = str(record.migration_id)
        outcome = self.table.outcomes.get(mid)
        if (
            outcome in (None, Outcome.PENDING)
            and self.launcher.ownership.clustered
            and await decide_in_store(self.launcher.ownership, record, commit=False)
        ):
            log.error("etcd says migration %s made %s ours, but its QEMU had ended: the "
                      "domain is lost; its disks stay", mid[:8], record.config.name)  # fmt: skip
            outcome = Outcome.COMMITTED
        if outcome is Outcome.COMMITTED:
            self.table.decide(mid, Outcome.COMMITTED)
            return
        # Never committed: a copy begun here (--copy-storage) goes with it.
        discard_disks(record)
        self.table.decide(mid, Outcome.ABORTED)

    async def _arriving(self, dom: RunningDomain) -> bool:
        """Keep an arriving domain if its commit was written; else end it.

        In a cluster the store has the last word: a commit whose answer the
        old ferryd never heard may have made the domain ours.
        """
        mid = str(dom.record.migration_id)
        outcome = self.table.outcomes.get(mid)
        clustered = self.launcher.ownership.clustered
        if (
            outcome is not Outcome.COMMITTED
            and clustered
            and await decide_in_store(self.launcher.ownership, dom.record, commit=False)
        ):
            log.info("etcd says migration %s made %s ours before the restart", mid[:8], dom.name)
            self.table.decide(mid, Outcome.COMMITTED)
            outcome = Outcome.COMMITTED
        if outcome is Outcome.COMMITTED:
            # Made here for this migration, the disks are the domain's own now.
            dom.record.created_disks = []
            status = await dom.monitor.execute("query-status")
            if isinstance(status, dict) and status.get("status") == "inmigrate":
                # Committed before a post-copy switch: the device state comes
                # when the source lets it through; run it then, not before.
                self.incoming.background.start(
                    self.incoming.run_when_loaded(dom, dom.record.migration_was_running),
                    f"arrival of {dom.name}",
                )
                return True
            resumed = False
            if dom.record.migration_was_running:
                try:
                    await dom.monitor.execute("cont")
                    resumed = True
                except QmpError as err:
                    log.error("committed domain %s could not resume: %s", dom.name, err)
            else:
                status = await dom.monitor.execute("query-status")
                resumed = bool(status.get("running"))
            event = Event.MIGRATE_IN_COMMIT if resumed else Event.MIGRATE_IN_COMMIT_PAUSED
            self.table.transition(dom, event)
            return True
        # Its migration session died with the old ferryd: no commit can come
        # any more, so this copy must never run.
        log.info("incoming domain %s was never committed; removing it", dom.name)
        self.table.add_incoming(Incoming(mid, dom, token="", peer="(before restart)"))
        dom.handed_over = True
        self.watcher.start(dom)
        await self.launcher.end_qemu(dom)
        discard_disks(dom.record)
        self.table.decide(mid, Outcome.ABORTED)
        return False

    async def _departing(self, dom: RunningDomain) -> None:
        """ferryd died while migrating this domain out: finish or undo it safely."""
        info: Any = await dom.monitor.execute("query-migrate")
        qemu_state = info.get("status") if isinstance(info, dict) else None
        doubtful = {"completed", HELD, *PAST_SWITCH}
        if await holds_for_commit(dom.monitor):
            # Held for the commit, a stream that ended otherwise may have
            # ended after it (let through, then failed): asking is safe.
            doubtful |= {"failed", "cancelled"}
        if qemu_state in doubtful and dom.record.migration_id:
            # The target may have resumed it (or, held before a post-copy
            # switch, committed it): only the target can say.
            self.outgoing.resume_in_doubt(dom)
            return
        if qemu_state not in (None, "none", "failed", "cancelled"):
            await dom.monitor.execute("migrate_cancel")
            await wait_migration_settled(dom.monitor)
        await self.end.keep(dom)
