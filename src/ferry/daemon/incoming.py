"""The target side of migrations on this host: validate, receive, commit or abort."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qemu.qmp import EventListener

from ferry.daemon.running import Incoming, RunningDomain
from ferry.domain.config import DomainConfig
from ferry.domain.state import Event, next_state
from ferry.errors import (
    FerryError,
    ImageError,
    MigrationError,
    MigrationRefused,
    QmpError,
    StorageError,
)
from ferry.migration.params import MigrationParams
from ferry.migration.source import FD_NAME
from ferry.network import tap
from ferry.storage import lease
from ferry.storage.disks import check_disks

if TYPE_CHECKING:
    from ferry.daemon.manager import DomainManager

log = logging.getLogger("ferryd")


class IncomingMigrations:
    """What the relocation server asks of this host (the TargetHost protocol)."""

    def __init__(self, manager: DomainManager) -> None:
        self.m = manager

    async def prepare_incoming(
        self,
        migration_id: str,
        mapping: Mapping[str, Any],
        params: MigrationParams,
        disks: list[Any],
        boot: Mapping[str, Any],
        peer: str,
    ) -> str:
        """Check everything, then start QEMU waiting for the stream; return its token."""
        cfg = DomainConfig.from_mapping(mapping, f"domain config from {peer}")
        where = f"host {self.m.host.name} refuses domain '{cfg.name}'"
        async with self.m.create_lock:
            local = self.m.domains.get(cfg.name)
            if local is not None and local.record.migration_id != migration_id:
                raise MigrationRefused(f"{where}: a domain of that name already runs there")
            if any(i.dom.name == cfg.name for i in self.m.incoming.values()):
                raise MigrationRefused(f"{where}: it is already arriving from another migration")
            try:
                check_disks(cfg, self.m.host.storage_roots, self.m.disks_in_use(exclude=local))
                await self._check_same_disks(cfg, disks)
                await asyncio.to_thread(tap.check_bridges, [v.bridge for v in cfg.vifs])
                self.m.check_memory(cfg)
                boot_files = self.m.boot_files(cfg)
                self._check_same_boot(cfg, boot)
                accel = (await self.m.accel(boot_files)).accel
            except FerryError as err:
                raise MigrationRefused(f"{where}: {err}") from err
            record = self.m.new_record(cfg, accel, key=f"{cfg.name}@{migration_id[:8]}")
            record.migration_id = migration_id
            record.state = next_state(cfg.name, record.state, Event.MIGRATE_IN)
            dom = await self.m.launch(record, boot_files, incoming=True)
            dom.record.save(self.m.layout.record_file(record.key))
            token = secrets.token_hex(16)
            self.m.incoming[migration_id] = Incoming(migration_id, dom, token, peer)
            dom.watcher = asyncio.create_task(self.m.watch(dom))
        try:
            await dom.monitor.execute(
                "migrate-set-capabilities",
                {
                    "capabilities": [
                        # Disks stay inactive after the stream until our "cont".
                        {"capability": "late-block-activate", "state": True},
                        {"capability": "events", "state": True},
                    ]
                },
            )
        except QmpError as err:
            await self.abort_incoming(migration_id, str(err))
            raise MigrationRefused(f"{where}: {err}") from err
        log.info("prepared incoming %s (migration %s) from %s", cfg.name, migration_id[:8], peer)
        return token

    async def _check_same_disks(self, cfg: DomainConfig, facts: list[Any]) -> None:
        if len(facts) != len(cfg.disks):
            raise StorageError("the source described a different number of disks")
        for disk, fact in zip(cfg.disks, facts, strict=True):
            if not isinstance(fact, dict):
                raise StorageError("malformed disk description")
            size = fact.get("size")
            if disk.is_url:
                here = await _url_virtual_size(disk.path)
            else:
                here = Path(disk.path).stat().st_size
            if size is not None and here != size:
                raise StorageError(
                    f"disk {disk.path} is {here} bytes here but {size} bytes on the source: "
                    "not the same image"
                )
            token = fact.get("lease_token")
            if token is not None:
                held = lease.read_lease(disk.path)
                if held is None or held.token != token:
                    raise StorageError(
                        f"disk {disk.path} here is not the source's disk (its lease differs): "
                        "is the storage really shared?"
                    )

    def _check_same_boot(self, cfg: DomainConfig, boot: Mapping[str, Any]) -> None:
        files = self.m.boot_files(cfg)
        if boot.get("kernel_sha256") != self.m.file_digest(files.kernel):
            raise ImageError(f"kernel {files.kernel} differs from the source's")
        want = boot.get("initrd_sha256")
        if want is not None and (files.initrd is None or want != self.m.file_digest(files.initrd)):
            raise ImageError(f"initrd {files.initrd} differs from the source's")

    async def start_incoming_stream(self, migration_id: str, token: str, fd: int) -> None:
        arriving = self.m.incoming.get(migration_id)
        if arriving is None or not secrets.compare_digest(arriving.token, token):
            raise MigrationRefused("no migration of that id and token is expected here")
        if arriving.streaming:
            raise MigrationRefused("this migration's stream is already connected")
        arriving.streaming = True
        monitor = arriving.dom.monitor
        arriving.events = monitor.watch_events(("MIGRATION",))
        await monitor.pass_fd(fd, FD_NAME)
        await monitor.execute("migrate-incoming", {"uri": f"fd:{FD_NAME}"})

    async def commit_incoming(self, migration_id: str, resume: bool) -> dict[str, Any]:
        """The source has stopped and sent everything: run the domain here."""
        arriving = self.m.incoming.get(migration_id)
        if arriving is None:
            raise MigrationError(f"migration {migration_id[:8]} is not pending here")
        dom = arriving.dom
        await self._wait_incoming_complete(dom)
        resume_ts: float | None = None
        with dom.monitor.listener(("RESUME",)) as events:
            if resume:
                await dom.monitor.execute("cont")
                event: Any = await asyncio.wait_for(events.get(), 10)
                stamp = event["timestamp"]
                resume_ts = stamp["seconds"] + stamp["microseconds"] / 1e6
        self.m.outcomes[migration_id] = "committed"
        del self.m.incoming[migration_id]
        loaded_ts = _event_time(arriving.events, "completed")
        if arriving.events is not None:
            dom.monitor.unwatch(arriving.events)
        commit = Event.MIGRATE_IN_COMMIT if resume else Event.MIGRATE_IN_COMMIT_PAUSED
        dom.record.state = next_state(dom.name, dom.record.state, commit)
        dom.record.started_at = time.time()
        dom.record.leases = [d.path for d in dom.record.config.disks if d.writable and not d.is_url]
        self.m.set_state(dom, dom.record.state)
        for path in dom.record.leases:
            held = lease.read_lease(path)
            lease.write_lease(path, self.m.host.name, dom.name, held.token if held else None)
        self.m.domains[dom.name] = dom
        with contextlib.suppress(QmpError):
            # Switches and clients learn at once where the VM's MAC lives now.
            await dom.monitor.execute("announce-self", _ANNOUNCE)
        log.info("committed incoming %s (migration %s)", dom.name, migration_id[:8])
        return {"resume_ts": resume_ts, "loaded_ts": loaded_ts}

    async def _wait_incoming_complete(self, dom: RunningDomain, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            info = await dom.monitor.execute("query-migrate")
            status = info.get("status") if isinstance(info, dict) else None
            if status == "completed":
                return
            if status in ("failed", "cancelled"):
                raise MigrationError(f"the incoming stream of '{dom.name}' {status} here")
            if time.monotonic() > deadline:
                raise MigrationError(
                    f"the incoming stream of '{dom.name}' did not complete within {timeout:.0f} s"
                )
            await asyncio.sleep(0.005)

    async def abort_incoming(self, migration_id: str, reason: str) -> None:
        arriving = self.m.incoming.pop(migration_id, None)
        self.m.outcomes.setdefault(migration_id, "aborted")
        if arriving is None:
            return
        dom = arriving.dom
        log.info("aborting incoming %s (migration %s): %s", dom.name, migration_id[:8], reason)
        dom.handed_over = True  # the leases were never ours
        await self.m.end_qemu(dom)

    def migration_outcome(self, migration_id: str) -> str:
        if migration_id in self.m.incoming:
            return "pending"
        return self.m.outcomes.get(migration_id, "aborted")


def _event_time(events: EventListener | None, status: str) -> float | None:
    """When QEMU reported migration ``status`` (its own clock, from the event)."""
    history: list[Any] = list(events.history) if events is not None else []
    for event in history:
        if event["data"].get("status") == status:
            stamp = event["timestamp"]
            return float(stamp["seconds"] + stamp["microseconds"] / 1e6)
    return None


_ANNOUNCE = {"initial": 50, "max": 550, "rounds": 5, "step": 100}


async def _url_virtual_size(url: str) -> int:
    proc = await asyncio.create_subprocess_exec(
        "qemu-img", "info", "-U", "--output=json", url,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 30)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise StorageError(f"disk {url} did not answer within 30 s") from None
    if proc.returncode != 0:
        raise StorageError(f"disk {url} cannot be opened here: {err.decode().strip()[-200:]}")
    return int(json.loads(out)["virtual-size"])
