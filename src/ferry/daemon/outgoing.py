"""The source side of migrations on this host: from ``ferry migrate`` to handing over."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING, Any

from ferry.daemon.running import RunningDomain
from ferry.domain.config import DomainConfig
from ferry.domain.state import Event, next_state
from ferry.errors import (
    FerryError,
    InvalidTransition,
    MigrationError,
    MigrationInDoubt,
    QmpError,
    StorageError,
)
from ferry.migration.params import MigrationParams
from ferry.migration.resolve import ask_outcome
from ferry.migration.source import OutgoingMigration, ProgressCallback
from ferry.storage import lease

if TYPE_CHECKING:
    from ferry.daemon.manager import DomainManager

log = logging.getLogger("ferryd")


class OutgoingMigrations:
    def __init__(self, manager: DomainManager) -> None:
        self.m = manager

    async def migrate(
        self,
        name: str,
        host: str,
        port: int,
        params: MigrationParams,
        on_progress: ProgressCallback,
    ) -> dict[str, Any]:
        dom = self.m.get(name)
        async with dom.lock:
            self.m.set_state(dom, next_state(name, dom.record.state, Event.MIGRATE_OUT))
        try:
            facts = await self._disk_facts(dom)
            boot = self._boot_facts(dom.record.config)
        except FerryError:
            await self._after_failed_migration(dom)
            raise
        out = OutgoingMigration(
            name=name,
            monitor=dom.monitor,
            config=dom.record.config.to_mapping(),
            host=host,
            port=port,
            params=params,
            local_host=self.m.host.name,
            disks=facts,
            boot=boot,
            on_progress=on_progress,
        )
        dom.outgoing = out
        dom.record.migration_id = out.migration_id
        dom.record.migration_target = f"{host}:{port}"
        self.m.set_state(dom, dom.record.state)
        try:
            result = await out.run()
        except MigrationInDoubt:
            self.m.background(self.resolve_in_doubt(dom, resume=True))
            raise
        except BaseException:
            await self._after_failed_migration(dom)
            raise
        finally:
            dom.outgoing = None
        await self._hand_over(dom)
        log.info("domain %s migrated to %s: %s", name, host, result.to_wire())
        return result.to_wire()

    async def abort_migration(self, name: str) -> None:
        dom = self.m.get(name)
        out = dom.outgoing
        if out is None:
            raise InvalidTransition(f"cannot abort: domain '{name}' is not migrating out")
        if out.phase in ("commit", "done"):
            raise InvalidTransition(
                f"cannot abort the migration of '{name}': it is already committing"
            )
        out.abort_requested.set()

    async def _after_failed_migration(self, dom: RunningDomain) -> None:
        """The migration failed before its commit: the domain is ours, as it was."""
        dom.record.migration_id = None
        dom.record.migration_target = None
        try:
            status = await dom.monitor.execute("query-status")
            event = (
                Event.MIGRATE_OUT_ABORT_RUNNING
                if status.get("running")
                else Event.MIGRATE_OUT_ABORT_PAUSED
            )
        except QmpError:
            event = Event.MIGRATE_OUT_ABORT_PAUSED
        self.m.set_state(dom, next_state(dom.name, dom.record.state, event))

    async def _hand_over(self, dom: RunningDomain) -> None:
        """The target runs the domain now: end our copy, keep its disks' leases theirs."""
        dom.handed_over = True
        self.m.set_state(dom, next_state(dom.name, dom.record.state, Event.MIGRATE_OUT_DONE))
        await self.m.end_qemu(dom)

    async def resolve_in_doubt(self, dom: RunningDomain, resume: bool) -> None:
        """Ask the target, until it answers, whether it resumed the domain."""
        target = dom.record.migration_target or ""
        host, _, port = target.rpartition(":")
        mid = str(dom.record.migration_id)
        delay = 1.0
        while True:
            try:
                outcome = await ask_outcome(host, int(port), mid, self.m.host.name)
            except (MigrationError, ValueError) as err:
                log.warning("migration %s of %s still in doubt: %s", mid[:8], dom.name, err)
                outcome = "pending"
            if outcome == "committed":
                log.info("target %s confirms it runs %s; ending our copy", host, dom.name)
                await self._hand_over(dom)
                return
            if outcome == "aborted":
                log.info("target %s never resumed %s; resuming it here", host, dom.name)
                if resume:
                    with contextlib.suppress(QmpError):
                        await dom.monitor.execute("cont")
                await self._after_failed_migration(dom)
                return
            await asyncio.sleep(delay)
            delay = min(delay * 2, 10.0)

    async def _disk_facts(self, dom: RunningDomain) -> list[dict[str, Any]]:
        """What the target needs to prove it sees the very same disks."""
        sizes: dict[str, int] = {}
        blocks = await dom.monitor.execute("query-block")
        for block in blocks if isinstance(blocks, list) else []:
            image = block.get("inserted", {}).get("image", {})
            qdev = str(block.get("qdev", ""))
            if "virtual-size" in image:
                sizes[qdev] = int(image["virtual-size"])
        facts = []
        for disk in dom.record.config.disks:
            index = ord(disk.target[-1]) - ord("a")
            size = next((v for k, v in sizes.items() if k.endswith(f"vd{index}")), None)
            fact: dict[str, Any] = {"path": disk.path, "size": size}
            if not disk.is_url and disk.writable:
                held = lease.read_lease(disk.path)
                if held is None or held.host != self.m.host.name:
                    raise StorageError(
                        f"cannot migrate '{dom.name}': this host does not hold the lease of "
                        f"disk {disk.path}"
                    )
                fact["lease_token"] = held.token
            facts.append(fact)
        return facts

    def _boot_facts(self, cfg: DomainConfig) -> dict[str, Any]:
        boot = self.m.boot_files(cfg)
        return {
            "kernel_sha256": self.m.file_digest(boot.kernel),
            "initrd_sha256": self.m.file_digest(boot.initrd) if boot.initrd else None,
        }
