"""How a migration ends on the source: handed over, kept, or held in doubt until the target says.

Once the commit has been sent, only the target knows whether it resumed the
domain. A source that lost the answer (connection cut, target restarting,
its own ferryd restarting) holds its copy paused and asks the target's
relocation server, again and again, until the answer is a decision:
``committed`` (end our copy) or ``aborted`` (the domain is ours again, and runs
again only if it ran before the migration). ``pending`` and ``unknown`` are
not decisions; nor is silence.

In a cluster, etcd decides instead, without the target: the domain key names
the target with this migration (committed), or the source rewrites its own key
so that the target's commit can never apply (aborted).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from ferry.domain.migration_state import UNKNOWN, Outcome
from ferry.domain.state import Event
from ferry.errors import ClusterError, MigrationError, QmpError, StorageError, WaitTimeout
from ferry.host.launcher import Launcher
from ferry.host.running import RunningDomain
from ferry.host.table import DomainTable
from ferry.migration.channel import Channel
from ferry.migration.disk_mirror import clear_leftovers
from ferry.migration.switchover import release_held, settle_for_handover
from ferry.pki.credentials import Credentials
from ferry.storage import lease

log = logging.getLogger("ferryd")

ASK_TIMEOUT = 10.0
FIRST_RETRY_S = 1.0
MAX_RETRY_S = 10.0

Ask = Callable[[str, int, str, str], Awaitable[str]]


async def ask_outcome(
    host: str, port: int, migration_id: str, local_host: str, credentials: Credentials | None
) -> str:
    """``committed``, ``aborted``, ``pending`` or ``unknown``, as the target says."""
    channel = await Channel.connect(host, port, ASK_TIMEOUT, credentials)
    try:
        await channel.send({"type": "status", "migration_id": migration_id, "host": local_host})
        reply = await channel.recv(ASK_TIMEOUT, "status")
    finally:
        await channel.close()
    outcome = reply.get("outcome")
    if outcome not in (*Outcome, UNKNOWN):
        raise MigrationError(f"{host} gave no usable outcome for migration {migration_id[:8]}")
    return str(outcome)


class SourceEnd:
    """The end of an outgoing migration, for the domain's copy on this host."""

    def __init__(self, table: DomainTable, launcher: Launcher, ask: Ask) -> None:
        self.table = table
        self.launcher = launcher
        self.ask = ask
        self.retry_s = FIRST_RETRY_S

    async def hand_over(self, dom: RunningDomain) -> None:
        """The target runs the domain now: end our copy; its disks' leases are theirs."""
        await self.release(dom)
        await self.launcher.end_qemu(dom)

    async def release(self, dom: RunningDomain) -> None:
        """The domain is the target's: no longer ours, though its QEMU is still to end.

        Saved before anything else: a ferryd restarting before the QEMU has
        ended finds the record shut off, and ends the QEMU as handed over.
        """
        await settle_for_handover(dom.monitor)
        dom.handed_over = True
        # Before the record says "shut off": a restart in between hands over
        # again, and marks again.
        _mark_moved(dom)
        self.table.transition(dom, Event.MIGRATE_OUT_DONE)
        self.table.leave(dom)

    async def keep(self, dom: RunningDomain) -> None:
        """The migration failed before its commit: the domain is ours, as it was.

        It runs again only if it ran when the migration began.
        """
        was_running = dom.record.migration_was_running
        dom.record.migration_id = None
        dom.record.migration_target = None
        dom.record.copied_away = []
        running = False
        try:
            if not await release_held(dom.monitor):
                raise MigrationError("its stream is past the switch to post-copy: never here again")
            # A --copy-storage migration's mirrors, if its ferryd died before
            # ending them: the domain runs on its own disks alone.
            await clear_leftovers(dom.monitor, dom.pid)
            status = await dom.monitor.execute("query-status")
            running = bool(status.get("running"))
            if was_running and not running:
                # After a completed stream the images are inactive; cont takes
                # them back (QEMU re-activates them) and runs the guest here.
                await dom.monitor.execute("cont")
                running = True
        except (QmpError, MigrationError, WaitTimeout) as err:
            log.error("cannot restore domain %s after its migration: %s", dom.name, err)
        event = Event.MIGRATE_OUT_ABORT_RUNNING if running else Event.MIGRATE_OUT_ABORT_PAUSED
        self.table.transition(dom, event)

    async def resolve_in_doubt(self, dom: RunningDomain) -> None:
        """Ask the store (in a cluster) or the target, until it decides."""
        if self.launcher.ownership.clustered:
            await self._settle_in_store(dom)
            return
        target = dom.record.migration_target or ""
        host, _, port = target.rpartition(":")
        mid = str(dom.record.migration_id)
        delay = self.retry_s
        while True:
            try:
                outcome = await self.ask(host, int(port), mid, self.table.host_name)
            except (MigrationError, ValueError) as err:
                log.warning("migration %s of %s still in doubt: %s", mid[:8], dom.name, err)
                outcome = Outcome.PENDING
            if outcome == Outcome.COMMITTED:
                log.info("target %s confirms it runs %s; ending our copy", host, dom.name)
                await self.hand_over(dom)
                return
            if outcome == Outcome.ABORTED:
                log.info("target %s never resumed %s; it is ours again", host, dom.name)
                await self.keep(dom)
                return
            if outcome == UNKNOWN:
                log.error(
                    "target %s does not know migration %s of %s (its state was lost?); "
                    "holding the domain paused here until it answers",
                    host, mid[:8], dom.name,
                )  # fmt: skip
            await asyncio.sleep(delay)
            delay = min(delay * 2, MAX_RETRY_S)

    async def _settle_in_store(self, dom: RunningDomain) -> None:
        mid = str(dom.record.migration_id)
        delay = self.retry_s
        while True:
            try:
                verdict = await self.launcher.ownership.settle_move(dom.name, mid)
                break
            except ClusterError as err:
                log.warning("migration %s of %s still in doubt: %s", mid[:8], dom.name, err)
            await asyncio.sleep(delay)
            delay = min(delay * 2, MAX_RETRY_S)
        if verdict == "committed":
            log.info(
                "etcd says the target runs %s (migration %s); ending our copy", dom.name, mid[:8]
            )
            await self.hand_over(dom)
        elif verdict == "aborted":
            log.info("etcd keeps %s ours (migration %s never committed)", dom.name, mid[:8])
            await self.keep(dom)
        else:
            # Nobody owns it (our lease expired): it may already run elsewhere.
            log.error(
                "domain %s: migration %s in doubt and etcd names no owner (this host's lease "
                "expired?); it stays paused here, never resumed by ferry",
                dom.name, mid[:8],
            )  # fmt: skip
            dom.record.migration_was_running = False
            await self.keep(dom)


def _mark_moved(dom: RunningDomain) -> None:
    """The disks left here by a --copy-storage migration are stale copies: their
    leases now name the target, so that nothing starts the domain here from them.

    (The files are kept, as libvirt keeps them: removing them is the
    operator's decision, once the domain runs well on its new host.)
    """
    target = str(dom.record.migration_target).rsplit(":", 1)[0]
    for path in dom.record.copied_away:
        try:
            lease.write_lease(path, target, dom.name)
        except StorageError as err:
            log.error("domain %s moved to %s, but its stale disk here is not marked: %s",
                      dom.name, target, err)  # fmt: skip
