"""The target driver: validate an arriving domain, receive it, commit or abort it.

The commit point on this side is the durable ``committed`` outcome: it is
written before the VM may resume, so that a source that lost the answer, or
this ferryd after a restart, can only ever conclude that the VM runs here.
A failure before it ends the arriving QEMU and answers ``aborted``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import shutil
import time
from collections.abc import Mapping
from typing import Any

from ferry.domain.config import DomainConfig
from ferry.domain.migration_state import UNKNOWN, Outcome
from ferry.domain.state import Event, next_state
from ferry.errors import (
    FerryError,
    MigrationError,
    MigrationRefused,
    QmpError,
    StorageError,
    refusal_reason,
)
from ferry.host.arriving_disks import discard_disks, make_disks
from ferry.host.launcher import Launcher
from ferry.host.record import DomainRecord
from ferry.host.running import Incoming, RunningDomain
from ferry.host.table import DomainTable
from ferry.host.watcher import DomainWatcher
from ferry.hypervisor import process
from ferry.migration.arrival_waits import (
    check_stream_alive,
    decide_in_store,
    event_time,
    wait_device_state,
    wait_stream_complete,
)
from ferry.migration.data_link import FD_NAME
from ferry.migration.disk_export import close_exports, export_disks
from ferry.migration.params import MigrationParams
from ferry.migration.sameness import SameDomain
from ferry.migration.stream_gate import start_gate
from ferry.migration.stream_setup import setup_target
from ferry.migration.target import Prepared
from ferry.migration.timeline import Timeline
from ferry.network import tap
from ferry.pki.identity import Identity
from ferry.pki.qemu_psk import StreamKey
from ferry.pki.qemu_tls import QemuTls
from ferry.storage import lease
from ferry.storage.disks import check_disks
from ferry.storage.new_disk import copied_disks
from ferry.util.tasks import Background

log = logging.getLogger("ferryd")

STREAM_COMPLETE_TIMEOUT = 30.0
# Arriving domains at once: each holds a paused QEMU and its memory.
MAX_PENDING = 4
RESUME_EVENT_TIMEOUT = 10.0
STREAM_KEY_DIR = "stream-key"
_ANNOUNCE = {"initial": 50, "max": 550, "rounds": 5, "step": 100}


class IncomingMigrations:
    """What the relocation server asks of this host (the TargetHost protocol)."""

    def __init__(
        self,
        table: DomainTable,
        launcher: Launcher,
        watcher: DomainWatcher,
        tls: QemuTls | None,
    ) -> None:
        # QEMU's TLS on the memory stream; None: insecure = true.
        self.tls = tls
        self.table = table
        self.launcher = launcher
        self.watcher = watcher
        self.host = launcher.host
        self.same = SameDomain(launcher)
        # Committed post-copy arrivals whose device state is still to come.
        self._switching: dict[str, tuple[RunningDomain, bool]] = {}
        # Such arrivals found again after a restart of ferryd.
        self.background = Background()

    async def prepare_incoming(
        self,
        migration_id: str,
        mapping: Mapping[str, Any],
        params: MigrationParams,
        disks: list[Any],
        boot: Mapping[str, Any],
        peer: str,
        source: Identity | None,
        source_host: str,
        bind: str,
        source_address: str,
    ) -> Prepared:
        """Check everything, then start QEMU waiting for the stream; return its token."""
        steps = Timeline()
        cfg = DomainConfig.from_mapping(mapping, f"domain config from {peer}")
        where = f"host {self.host.name} refuses domain '{cfg.name}'"

        def refused(why: object, reason: str) -> MigrationRefused:
            return MigrationRefused(f"{where}: {why}", reason)

        async with self.table.claim_lock:
            # Just migrated away from here and now coming back: the old
            # copy's QEMU may still be ending, its disks still open.
            await self.table.wait_gone(cfg.name)
            local = self.table.find(cfg.name)
            if local is not None and local.record.migration_id != migration_id:
                raise refused("a domain of that name already runs there", "exists")
            if self.table.arriving(cfg.name):
                raise refused("it is already arriving from another migration", "exists")
            if len(self.table.incoming_ids()) >= MAX_PENDING:
                raise refused(f"{MAX_PENDING} migrations are arriving already", "busy")
            if self.table.outcomes.get(migration_id) is not None:
                raise refused(f"migration {migration_id[:8]} was seen before", "replay")
            roots = self.host.storage_roots
            new = {d.path for d in copied_disks(cfg)} if params.copy_storage else set()
            try:
                if params.copy_storage and (self.tls is None or source is None):
                    raise MigrationRefused(
                        "--copy-storage needs TLS (this host has insecure = true): a disk "
                        "export without it would let anyone on the network write the disk",
                        "stream",
                    )
                in_use = self.table.disks_in_use(roots, exclude=local)
                check_disks(cfg, roots, in_use, self.host.storage_servers, new)
                to_make = self.same.new_disks(cfg, disks, params)
                await asyncio.to_thread(tap.check_bridges, [v.bridge for v in cfg.vifs])
                self.launcher.check_memory(cfg, self.table.promised_mib())
                boot_files = self.launcher.boot_files(cfg)
                accel = (await self.launcher.accel()).accel
                steps.mark("checks")
                ticket = await self.launcher.ownership.expect_move(
                    cfg.name, source_host, self.launcher.owned_disks(cfg, new)
                )
                steps.mark("ownership")
            except FerryError as err:
                raise refused(err, refusal_reason(err)) from err
            key = f"{cfg.name}@{migration_id[:8]}"
            record = self.launcher.new_record(cfg, accel, key, self.table.next_domid())
            record.migration_id = migration_id
            record.migration_source = source_host
            record.move_revision = ticket.revision
            record.owned_disks = list(ticket.disks)
            record.state = next_state(cfg.name, record.state, Event.MIGRATE_IN)
            # On disk before QEMU starts: a restart finds the migration either
            # way, and the outcome is never "unknown" for an id we prepared.
            self.table.outcomes.begin(migration_id)
            try:
                record_file = self.table.layout.record_file(record.key)
                await make_disks(record, to_make, lambda: record.save(record_file))
            except BaseException as err:
                self._forget(record)
                if isinstance(err, FerryError):
                    raise refused(err, "storage") from err
                raise
            steps.mark("disks")
            # The costly checks (qemu-img on each disk, the boot files' digests)
            # run while QEMU starts (56-115 ms here): it starts paused, waiting
            # for a stream that only a passed prepare admits, its disks
            # inactive, and it is ended at once if they fail.
            launching = asyncio.create_task(
                self.launcher.launch(record, boot_files, incoming=True),
                name=f"launch of arriving {cfg.name}",
            )
            try:
                unlike = await self._unlike(cfg, disks, params, boot)
                steps.mark("same")
                dom = await launching
            except BaseException:
                # A failed launch has ended its QEMU; a cancelled one ends it now;
                # one that had finished is ended here.
                launching.cancel()
                with contextlib.suppress(BaseException):
                    started = await launching
                    # As a failed launch ends its own: nothing of it ran yet.
                    await started.monitor.close()
                    if started.pid is not None:
                        await process.terminate(started.pid, 0)
                    await asyncio.to_thread(self.launcher.cleanup_files, record, started.paths)
                self._forget(record)
                raise
            steps.mark("launch")
            token = secrets.token_hex(16)
            arriving = Incoming(migration_id, dom, token, peer, postcopy=params.postcopy)
            self.table.add_incoming(arriving)
            self.watcher.start(dom)
        if unlike is not None:
            await self.abort_incoming(migration_id, str(unlike))
            raise refused(unlike, "unlike") from unlike
        if params.multifd:
            # QEMU connects the channels itself: no data connection will come.
            arriving.streaming = True
            arriving.events = dom.monitor.watch_events(("MIGRATION",))
        storage: dict[str, Any] = {}
        try:
            stream = await setup_target(
                dom.monitor, params, self.tls, source, StreamKey.new(migration_id),
                dom.paths.run_dir / STREAM_KEY_DIR, bind,
            )  # fmt: skip
            copied = copied_disks(cfg) if params.copy_storage else []
            if copied and self.tls is not None and source is not None:
                # (No disk to copy, no server: max-connections 0 means no limit.)
                storage = await export_disks(dom.monitor, copied, bind, self.tls, source)
                arriving.exports = storage["port"]
                if dom.pid is not None:
                    # Until the commit: one connection per disk, the source's.
                    gate = start_gate(
                        cfg.name, dom.pid, arriving.exports, source_address, len(copied), None
                    )
                    arriving.gates.append(gate)
        except (FerryError, OSError) as err:
            await self.abort_incoming(migration_id, str(err))
            raise refused(err, "stream") from err
        except BaseException as err:
            # Whatever else: the launched QEMU and its slot are not left behind.
            await self.abort_incoming(migration_id, repr(err))
            raise
        if stream and dom.pid is not None:
            arriving.gates.append(start_gate(
                cfg.name, dom.pid, stream["port"], source_address, params.channels + 1
            ))  # fmt: skip
        steps.mark("qemu_setup")
        log.info("prepared incoming %s (migration %s) from %s", cfg.name, migration_id[:8], peer)
        return Prepared(token, steps.steps_ms, stream, storage)

    def _forget(self, record: DomainRecord) -> None:
        """A prepare that ends before its QEMU runs: nothing of it is left on record."""
        discard_disks(record)
        with contextlib.suppress(FileNotFoundError):
            self.table.layout.record_file(record.key).unlink()
        self.table.decide(str(record.migration_id), Outcome.ABORTED)

    async def _unlike(
        self,
        cfg: DomainConfig,
        disks: list[Any],
        params: MigrationParams,
        boot: Mapping[str, Any],
    ) -> FerryError | None:
        """Why this host would not run the very domain the source runs, if it would not."""
        try:
            await self.same.disks(cfg, disks, params)
            await self.same.boot(cfg, boot)
        except FerryError as err:
            return err
        return None

    async def start_incoming_stream(self, migration_id: str, token: str, fd: int) -> None:
        arriving = self.table.incoming(migration_id)
        if arriving is None or not secrets.compare_digest(arriving.token, token):
            raise MigrationRefused("no migration of that id and token is expected here", "access")
        if arriving.streaming:
            raise MigrationRefused("this migration's stream is already connected", "protocol")
        arriving.streaming = True
        monitor = arriving.dom.monitor
        arriving.events = monitor.watch_events(("MIGRATION",))
        await monitor.pass_fd(fd, FD_NAME)
        await monitor.execute("migrate-incoming", {"uri": f"fd:{FD_NAME}"})

    async def commit_incoming(self, migration_id: str, resume: bool) -> dict[str, Any]:
        """The source has stopped and sent everything: the domain is this host's now.

        Raises (and the caller aborts) only before the commit point; after it,
        whatever fails leaves the domain here, paused at worst, and is logged.
        """
        arriving = self.table.incoming(migration_id)
        if arriving is None:
            raise MigrationError(f"migration {migration_id[:8]} is not pending here")
        dom = arriving.dom
        if arriving.postcopy:
            # The source holds its VM stopped before the switch: the device
            # state and the rest of RAM come only after this commit.
            await check_stream_alive(dom)
        else:
            await wait_stream_complete(dom, STREAM_COMPLETE_TIMEOUT)
        if arriving.exports:
            # The source's mirrors ended before its stream went through. The
            # gate keeps strangers off until the server has stopped.
            await close_exports(dom.monitor, dom.pid, arriving.exports)
        _stop_gate(arriving)
        # Every channel has connected: the one-time key has done its job.
        shutil.rmtree(dom.paths.run_dir / STREAM_KEY_DIR, ignore_errors=True)
        dom.record.migration_was_running = resume
        self.table.save(dom)
        # In a cluster, the commit point: the transaction that makes the domain
        # and its disks this host's. Recorded here (durably) right after.
        if self.table.incoming(migration_id) is not arriving:
            raise MigrationError(f"the arriving QEMU of '{dom.name}' ended before the commit")
        arriving.deciding = True
        committed = await self.decide_in_store(dom, commit=True)
        arriving.deciding = False
        if self.table.incoming(migration_id) is not arriving:
            # Its QEMU ended while the store decided: settled here, not by the watcher.
            self._settle_lost(dom, committed)
            raise MigrationError(f"the arriving QEMU of '{dom.name}' ended during the commit")
        if not committed:
            raise MigrationError(
                f"the cluster store no longer names {dom.record.migration_source} the owner of "
                f"'{dom.name}' (or this host holds no valid lease): not committed"
            )
        self.table.decide(migration_id, Outcome.COMMITTED)
        # Made here for this migration, the disks are the domain's own now.
        dom.record.created_disks = []
        try:
            self.table.save(dom)
        except OSError as err:
            # Past the commit point nothing may undo it; re-attach clears the list.
            log.error("domain %s: its record was not saved after the commit: %s", dom.name, err)
        if arriving.postcopy:
            # First thing after the commit point: whatever fails below, the
            # session still runs the domain once its device state is in.
            self._switching[migration_id] = (dom, resume)
        self.table.commit_incoming(migration_id)
        loaded_ts = event_time(arriving.events, "completed")
        if arriving.events is not None:
            dom.monitor.unwatch(arriving.events)
        dom.record.started_at = time.time()
        dom.record.leases = [d.path for d in dom.record.config.disks if d.writable and not d.is_url]
        self._take_leases(dom)
        log.info("committed incoming %s (migration %s)", dom.name, migration_id[:8])
        if arriving.postcopy:
            return {"switch": "after-commit"}
        return {"resume_ts": await self._start(dom, resume), "loaded_ts": loaded_ts}

    def _settle_lost(self, dom: RunningDomain, committed: bool) -> None:
        """An arrival whose QEMU ended while the store decided: the store's word stands.

        Committed, the domain is this host's and lost with its QEMU; the disks
        made for it keep what the source wrote until it stopped, and stay.
        """
        mid = str(dom.record.migration_id)
        if committed:
            log.error("domain %s committed here (migration %s) but its QEMU had ended: it is "
                      "lost; its disks stay", dom.name, mid[:8])  # fmt: skip
            self.table.decide(mid, Outcome.COMMITTED)
        else:
            discard_disks(dom.record)
            self.table.decide(mid, Outcome.ABORTED)

    async def finish_switch(self, migration_id: str) -> dict[str, Any]:
        """After a post-copy commit: run the domain once its device state is here."""
        entry = self._switching.pop(migration_id, None)
        if entry is None:
            return {}  # a pre-copy's, or not committed
        return {"resume_ts": await self.run_when_loaded(*entry)}

    async def run_when_loaded(self, dom: RunningDomain, resume: bool) -> float | None:
        """A committed domain whose state is still arriving: run it (if it ran) once loaded.

        Never raises: the domain is this host's whatever happens; a QEMU that
        ends before its state arrives has lost it (the post-copy guarantee).
        """
        try:
            await wait_device_state(dom)
        except FerryError as err:
            log.error("domain %s (migration %s) is lost: %s", dom.name,
                      str(dom.record.migration_id)[:8], err)  # fmt: skip
            return None
        return await self._start(dom, resume)

    async def _start(self, dom: RunningDomain, resume: bool) -> float | None:
        """The committed domain's state is all here: run it (if it ran), and announce it."""
        resume_ts = await self._resume(dom) if resume else None
        self.table.transition(
            dom,
            Event.MIGRATE_IN_COMMIT if resume_ts is not None else Event.MIGRATE_IN_COMMIT_PAUSED,
        )
        with contextlib.suppress(QmpError):
            # Switches and clients learn at once where the VM's MAC lives now.
            await dom.monitor.execute("announce-self", _ANNOUNCE)
        return resume_ts

    async def decide_in_store(self, dom: RunningDomain, commit: bool) -> bool:
        return await decide_in_store(self.launcher.ownership, dom.record, commit)

    def _take_leases(self, dom: RunningDomain) -> None:
        for path in dom.record.leases:
            try:
                held = lease.read_lease(path)
                lease.write_lease(path, self.host.name, dom.name, held.token if held else None)
            except StorageError as err:
                log.error("domain %s runs here but its disk lease was not moved: %s", dom.name, err)

    async def _resume(self, dom: RunningDomain) -> float | None:
        """``cont``, and the time QEMU says the VM resumed; None if it stays paused."""
        with dom.monitor.listener(("RESUME",)) as events:
            try:
                await dom.monitor.execute("cont")
            except QmpError as err:
                log.error(
                    "committed domain %s could not resume; it stays paused: %s", dom.name, err
                )
                return None
            try:
                event: Any = await asyncio.wait_for(events.get(), RESUME_EVENT_TIMEOUT)
            except TimeoutError:
                log.warning("domain %s resumed but QEMU sent no RESUME event", dom.name)
                return time.time()
        stamp = event["timestamp"]
        return float(stamp["seconds"] + stamp["microseconds"] / 1e6)

    async def abort_incoming(self, migration_id: str, reason: str) -> None:
        arriving = self.table.drop_incoming(migration_id)
        if arriving is None:
            if self.table.outcomes.get(migration_id) is Outcome.PENDING:
                self.table.decide(migration_id, Outcome.ABORTED)
            return
        _stop_gate(arriving)
        dom = arriving.dom
        log.info("aborting incoming %s (migration %s): %s", dom.name, migration_id[:8], reason)
        dom.handed_over = True  # the leases were never ours
        await self.launcher.end_qemu(dom)
        discard_disks(dom.record)
        # Only once its QEMU has ended: "aborted" tells the source it may resume.
        self.table.decide(migration_id, Outcome.ABORTED)

    def migration_outcome(self, migration_id: str) -> str:
        if self.table.incoming(migration_id) is not None:
            return Outcome.PENDING.value
        outcome = self.table.outcomes.get(migration_id)
        return outcome.value if outcome is not None else UNKNOWN

    async def close(self) -> None:
        """ferryd is stopping: nobody will be left here to commit arriving domains."""
        await self.background.close()
        for mid in self.table.incoming_ids():
            arriving = self.table.incoming(mid)
            if arriving is not None and arriving.deciding:
                # Left as it is (paused, pending): the next ferryd asks the store.
                continue
            await self.abort_incoming(mid, "ferryd is stopping")


def _stop_gate(arriving: Incoming) -> None:
    for gate in arriving.gates:
        gate.cancel()
    arriving.gates = []
