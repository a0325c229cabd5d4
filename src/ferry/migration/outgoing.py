"""The source driver: from ``ferry migrate`` to handing the domain over, or keeping it."""

from __future__ import annotations

import logging
import time
import uuid
from collections import deque
from typing import Any

from ferry.domain.migration_state import Phase
from ferry.domain.state import DomainState, Event
from ferry.errors import InvalidTransition, MigrationAborted, MigrationRefused, StorageError
from ferry.host.launcher import Launcher
from ferry.host.running import OutgoingControl, RunningDomain
from ferry.host.table import DomainTable
from ferry.migration.indoubt import SourceEnd
from ferry.migration.params import MigrationParams
from ferry.migration.sameness import boot_facts
from ferry.migration.source import OutgoingMigration, ProgressCallback
from ferry.migration.stream_plan import plan_stream
from ferry.pki.qemu_tls import QemuTls
from ferry.storage import lease
from ferry.storage.cache_safety import migration_hazard
from ferry.storage.new_disk import copied_disks
from ferry.util.metrics import Metrics
from ferry.util.tasks import Background

log = logging.getLogger("ferryd")
RECENT = 20


class OutgoingMigrations:
    def __init__(
        self,
        table: DomainTable,
        launcher: Launcher,
        end: SourceEnd,
        background: Background,
        tls: QemuTls | None,
        metrics: Metrics | None = None,
    ) -> None:
        self.tls = tls
        self.metrics = metrics or Metrics()
        self.table = table
        self.launcher = launcher
        self.end = end
        self.background = background
        # The last migrations that ended here, newest first (for the dashboard).
        self.recent: deque[dict[str, Any]] = deque(maxlen=RECENT)

    async def migrate(
        self,
        name: str,
        host: str,
        port: int,
        params: MigrationParams,
        on_progress: ProgressCallback,
    ) -> dict[str, Any]:
        dom = self.table.get(name)
        control = OutgoingControl(migration_id=uuid.uuid4().hex)
        async with dom.lock:
            was_running = dom.record.state is DomainState.RUNNING
            dom.record.migration_was_running = was_running
            dom.record.migration_id = control.migration_id
            dom.record.migration_target = f"{host}:{port}"
            copied = copied_disks(dom.record.config)
            dom.record.copied_away = [d.path for d in copied] if params.copy_storage else []
            self.table.transition(dom, Event.MIGRATE_OUT)
            dom.outgoing = control

        def track(update: dict[str, Any]) -> None:
            control.progress = update
            on_progress(update)

        try:
            began = time.monotonic()
            plan = plan_stream(params, secure=self.tls is not None)
            if params.copy_storage and self.tls is None:
                raise MigrationRefused(
                    f"cannot migrate '{name}' with --copy-storage: this host has insecure = true, "
                    "and a disk copy without TLS would let anyone on the network write the disk"
                )
            if params.copy_storage and not copied:
                raise MigrationRefused(
                    f"cannot migrate '{name}' with --copy-storage: it has no writable file disk "
                    "to copy (URL and read-only disks are not copied)"
                )
            facts = await self._disk_facts(dom, params)
            boot = await boot_facts(self.launcher, dom.record.config)
            facts_ms = round((time.monotonic() - began) * 1000, 1)
            out = OutgoingMigration(
                name=name,
                monitor=dom.monitor,
                config=dom.record.config.to_mapping(),
                host=host,
                port=port,
                params=plan.params,
                plan_reason=plan.reason,
                qemu_pid=dom.pid,
                local_host=self.table.host_name,
                disks=facts,
                boot=boot,
                on_progress=track,
                resume=was_running,
                control=control,
                tls=self.tls,
                copy_disks=[d.index for d in copied] if params.copy_storage else [],
            )
            result = await out.run()
        except BaseException as err:
            self.metrics.migration_ended(_failed_outcome(control.phase, err))
            self._ended(name, host, _failed_outcome(control.phase, err), {"error": str(err)})
            if control.phase is Phase.IN_DOUBT:
                # The commit may have been applied (a lost answer, or this task
                # cancelled while waiting for it): never keep; ask. A ferryd
                # stopping here leaves it to the next one's re-attach.
                self.background.start(
                    self._in_doubt(dom), f"in-doubt {control.migration_id[:8]} of {name}"
                )
                raise
            dom.outgoing = None
            if control.phase is Phase.DONE:
                # Committed: the domain is the target's, even if its post-copy
                # broke on the way (PostcopyFailed says it is lost).
                await self.end.hand_over(dom)
            else:
                await self.end.keep(dom)
            raise
        dom.outgoing = None
        began = time.monotonic()
        # The answer goes out now; our copy's QEMU ends behind it (~30 ms).
        await self.end.release(dom)
        self.background.start(self.launcher.end_qemu(dom), f"end of {name}'s old copy")
        result.steps_ms = {
            "facts": facts_ms,
            **result.steps_ms,
            "handover": round((time.monotonic() - began) * 1000, 1),
        }
        self.metrics.migration_ended(
            "completed", result.total_s, result.switchover_ms, result.bytes_sent
        )
        self._ended(name, host, "completed", result.to_wire())
        log.info("domain %s migrated to %s: %s", name, host, result.to_wire())
        return result.to_wire()

    def in_progress(self) -> list[dict[str, Any]]:
        """Every outgoing migration now, with its latest progress."""
        return [
            {
                "name": dom.name,
                "target": str(dom.record.migration_target).rsplit(":", 1)[0],
                "phase": dom.outgoing.phase.value,
                "started_at": dom.outgoing.started_at,
                "progress": dom.outgoing.progress,
            }
            for dom in self.table.everyone()
            if dom.outgoing is not None
        ]

    def _ended(self, name: str, host: str, outcome: str, facts: dict[str, Any]) -> None:
        keep = ("total_s", "switchover_ms", "bytes_sent", "passes", "postcopy", "error")
        self.recent.appendleft(
            {"name": name, "source": self.table.host_name, "target": host, "outcome": outcome,
             "ended_at": time.time()} | {k: v for k, v in facts.items() if k in keep}
        )  # fmt: skip

    async def _in_doubt(self, dom: RunningDomain) -> None:
        try:
            await self.end.resolve_in_doubt(dom)
        finally:
            dom.outgoing = None

    def resume_in_doubt(self, dom: RunningDomain) -> None:
        """After a restart of ferryd: a domain whose commit was sent before it went down."""
        # The commit may have reached the target: the phase is in-doubt already.
        dom.outgoing = OutgoingControl(str(dom.record.migration_id), phase=Phase.IN_DOUBT)
        self.background.start(
            self._in_doubt(dom), f"in-doubt {str(dom.record.migration_id)[:8]} of {dom.name}"
        )

    async def abort_migration(self, name: str) -> None:
        dom = self.table.get(name)
        control = dom.outgoing
        if control is None:
            raise InvalidTransition(f"cannot abort: domain '{name}' is not migrating out")
        if not control.phase.abortable:
            raise InvalidTransition(
                f"cannot abort the migration of '{name}': it is already {control.phase.value}"
            )
        control.abort_requested.set()

    async def _disk_facts(
        self, dom: RunningDomain, params: MigrationParams
    ) -> list[dict[str, Any]]:
        """What the target needs to prove it sees the very same disks."""
        copied = copied_disks(dom.record.config) if params.copy_storage else []
        for disk in dom.record.config.disks:
            # A copied disk's page cache stays here: the target reads its own file.
            hazard = None if params.unsafe_cache or disk in copied else migration_hazard(disk)
            if hazard is not None:
                raise MigrationRefused(f"cannot migrate '{dom.name}': {hazard}")
        images: dict[str, dict[str, Any]] = {}
        blocks = await dom.monitor.execute("query-block")
        for block in blocks if isinstance(blocks, list) else []:
            image = block.get("inserted", {}).get("image", {})
            if isinstance(image, dict) and "virtual-size" in image:
                # The drive's id (ferry's -drive id=diskN), not the qdev path,
                # which ends in /virtio-backend.
                images[str(block.get("device", ""))] = image
        facts = []
        for disk in dom.record.config.disks:
            image = images.get(f"disk{disk.index}", {})
            fact: dict[str, Any] = {
                "path": disk.path,
                "size": image.get("virtual-size"),
                "format": image.get("format"),
            }
            if disk in copied:
                # What the copy will take on the target's file system.
                fact["allocated"] = image.get("actual-size", image.get("virtual-size"))
            if not disk.is_url and disk.writable:
                held = lease.read_lease(disk.path)
                if held is None or held.host != self.table.host_name:
                    raise StorageError(
                        f"cannot migrate '{dom.name}': this host does not hold the lease of "
                        f"disk {disk.path}"
                    )
                fact["lease_token"] = held.token
            facts.append(fact)
        return facts


def _failed_outcome(phase: Phase, err: BaseException) -> str:
    """The metrics' outcome of a migration that raised ``err`` in ``phase``."""
    if phase is Phase.IN_DOUBT:
        return "in_doubt"
    if phase is Phase.DONE:
        return "lost"
    return "aborted" if isinstance(err, MigrationAborted) else "kept"
