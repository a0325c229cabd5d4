"""The domains of one host: create, find again after a restart, drive, end.

Each running domain has a :class:`RunningDomain`: its record (saved in the
state directory at every state change), its QMP monitor and a watcher task
that notices when QEMU ends by itself (guest power-off, crash) and cleans up
after it. Every request on a domain holds that domain's lock, so two requests
never interleave on one QEMU.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import shutil
import time
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qemu.qmp import EventListener

from ferry.config.host import HostConfig
from ferry.daemon.layout import HostLayout
from ferry.daemon.record import DomainRecord, load_record
from ferry.domain.config import DomainConfig
from ferry.domain.state import DomainState, Event, next_state
from ferry.errors import (
    DomainExists,
    DomainNotFound,
    FerryError,
    HypervisorError,
    ImageError,
    InvalidTransition,
    MigrationError,
    MigrationInDoubt,
    MigrationRefused,
    QmpError,
    StorageError,
)
from ferry.hypervisor import process
from ferry.hypervisor.accel import ProbeResult, resolve_accel
from ferry.hypervisor.cmdline import BootFiles, MachinePaths, build_qemu_args
from ferry.hypervisor.monitor import Monitor
from ferry.migration.params import MigrationParams
from ferry.migration.source import FD_NAME, OutgoingMigration, ProgressCallback
from ferry.network import tap
from ferry.storage import lease
from ferry.storage.disks import check_disks, resolve_disk

log = logging.getLogger("ferryd")

LAUNCH_TIMEOUT = 60.0
QMP_TIMEOUT = 10.0
DESTROY_GRACE = 5.0


@dataclass
class RunningDomain:
    record: DomainRecord
    paths: MachinePaths
    monitor: Monitor
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    watcher: asyncio.Task[None] | None = None
    ending: bool = False
    outgoing: OutgoingMigration | None = None
    # Migrated away: the disk leases now belong to the target host.
    handed_over: bool = False

    @property
    def name(self) -> str:
        return self.record.config.name


@dataclass
class Incoming:
    """A domain arriving by migration, until its commit or abort."""

    migration_id: str
    dom: RunningDomain
    token: str
    peer: str
    streaming: bool = False
    events: EventListener | None = None


BootFilesProvider = Callable[[DomainConfig], BootFiles]


class DomainManager:
    def __init__(
        self,
        host: HostConfig,
        layout: HostLayout,
        boot_files: BootFilesProvider,
        accel_cache: Path | None = None,
    ) -> None:
        self.host = host
        # The probe's verdict is a property of the machine, not of one daemon's
        # state: shared by every ferryd on it, it costs one probe per machine.
        self.accel_cache = accel_cache or layout.state_dir / "accel-probe.json"
        self.layout = layout
        self.boot_files = boot_files
        self.domains: dict[str, RunningDomain] = {}
        self.incoming: dict[str, Incoming] = {}
        # Decided migrations (target side), for a source that lost the answer.
        self.outcomes: dict[str, str] = {}
        self._create_lock = asyncio.Lock()
        self._digests: dict[tuple[str, int], str] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._accel: ProbeResult | None = None

    def _background(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- start-up ------------------------------------------------------------

    async def reattach_all(self) -> None:
        """Find the QEMUs still running from before a restart of ferryd."""
        if not self.layout.domains_dir.exists():
            return
        for directory in sorted(self.layout.domains_dir.iterdir()):
            record_file = directory / "record.json"
            if not record_file.exists():
                continue
            try:
                record = load_record(record_file)
                await self._reattach(record)
            except FerryError as err:
                log.error("cannot re-attach %s: %s", directory.name, err)

    async def _reattach(self, record: DomainRecord) -> None:
        name = record.config.name
        paths = self.layout.machine_paths(record.key)
        pid = process.read_pidfile(paths.pidfile) or record.pid
        if pid is None or not process.is_our_qemu(pid, paths.qmp_socket):
            log.info("domain %s ended while ferryd was away; cleaning up", name)
            await asyncio.to_thread(self._cleanup_files, record, paths)
            return
        record.pid = pid
        monitor = Monitor(name)
        await monitor.connect(paths.qmp_socket, QMP_TIMEOUT)
        dom = RunningDomain(record=record, paths=paths, monitor=monitor)
        status = await monitor.execute("query-status")
        if record.state is DomainState.MIGRATING_IN:
            if status.get("running"):
                # The commit reached QEMU before ferryd went down.
                record.state = DomainState.RUNNING
                self.outcomes[str(record.migration_id)] = "committed"
            else:
                # Its migration session died with the old ferryd: no commit
                # can come any more, so this copy must never run.
                log.info("incoming domain %s was never committed; removing it", name)
                self.outcomes[str(record.migration_id)] = "aborted"
                await monitor.close()
                await process.terminate(pid, 0)
                await asyncio.to_thread(self._cleanup_files, record, paths)
                return
        elif record.state is DomainState.MIGRATING_OUT:
            await self._recover_outgoing(dom, status)
        else:
            record.state = _state_from_qmp(status, record.state)
        record.save(self.layout.record_file(record.key))
        self.domains[name] = dom
        dom.watcher = asyncio.create_task(self._watch(dom))
        log.info("re-attached domain %s (pid %d, %s)", name, pid, record.state.value)

    async def _recover_outgoing(self, dom: RunningDomain, status: dict[str, Any]) -> None:
        """ferryd died while migrating this domain out: finish or undo it safely."""
        info = await dom.monitor.execute("query-migrate")
        qemu_state = info.get("status") if isinstance(info, dict) else None
        if qemu_state == "completed" and dom.record.migration_id:
            # The target may have resumed it: only the target can say.
            dom.record.state = DomainState.MIGRATING_OUT
            self._background(self._resolve_in_doubt(dom, resume=True))
            return
        if qemu_state not in (None, "none", "failed", "cancelled"):
            await dom.monitor.execute("migrate_cancel")
        status = await dom.monitor.execute("query-status")
        dom.record.state = DomainState.RUNNING if status.get("running") else DomainState.PAUSED

    # -- queries -------------------------------------------------------------

    def get(self, name: str) -> RunningDomain:
        try:
            return self.domains[name]
        except KeyError:
            raise DomainNotFound(
                f"domain '{name}' does not exist on host {self.host.name}"
            ) from None

    def list_rows(self) -> list[dict[str, Any]]:
        rows = []
        everyone = [*self.domains.values(), *(i.dom for i in self.incoming.values())]
        for dom in sorted(everyone, key=lambda d: d.record.domid):
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
        dom = self.get(name)
        return {
            "config": dom.record.config.to_mapping(),
            "console_socket": str(dom.paths.console_socket),
            "console_log": str(dom.paths.console_log),
            "qemu_log": str(dom.paths.qemu_log),
            **next(r for r in self.list_rows() if r["id"] == dom.record.domid),
        }

    # -- create --------------------------------------------------------------

    async def accel(self, boot: BootFiles) -> ProbeResult:
        if self._accel is None:
            assert boot.initrd is not None or self.host.accel != "auto"
            self._accel = await resolve_accel(
                self.host.accel,
                self.host.qemu_binary,
                boot.kernel,
                boot.initrd or boot.kernel,
                self.accel_cache,
            )
            log.info("accelerator: %s (%s)", self._accel.accel, self._accel.reason)
        return self._accel

    async def create(self, mapping: Mapping[str, Any]) -> dict[str, Any]:
        cfg = DomainConfig.from_mapping(mapping, "domain config")
        async with self._create_lock:
            if cfg.name in self.domains or any(
                i.dom.name == cfg.name for i in self.incoming.values()
            ):
                raise DomainExists(
                    f"cannot create domain '{cfg.name}': a domain of that name is already "
                    f"running on host {self.host.name}"
                )
            try:
                check_disks(cfg, self.host.storage_roots, self._disks_in_use())
                await asyncio.to_thread(tap.check_bridges, [v.bridge for v in cfg.vifs])
                self._check_memory(cfg)
                boot = self.boot_files(cfg)
                accel = (await self.accel(boot)).accel
                leases = self._acquire_leases(cfg)
            except FerryError as err:
                raise type(err)(f"cannot create domain '{cfg.name}': {err}") from err
            record = self._new_record(cfg, accel, key=cfg.name)
            record.leases = leases
            try:
                dom = await self._launch(record, boot)
            except FerryError:
                self._release_leases(record)
                raise
            self._set_state(dom, next_state(cfg.name, record.state, Event.START))
            self.domains[cfg.name] = dom
            dom.watcher = asyncio.create_task(self._watch(dom))
        log.info("created domain %s (id %d, pid %s, %s)", cfg.name, record.domid, record.pid, accel)
        return {"name": cfg.name, "id": record.domid, "accel": accel, "ignored": list(cfg.ignored)}

    def _new_record(self, cfg: DomainConfig, accel: str, key: str) -> DomainRecord:
        domid = self._next_domid()
        return DomainRecord(
            config=cfg,
            domid=domid,
            state=DomainState.SHUTOFF,
            started_at=time.time(),
            taps=[tap.tap_name(domid, i) for i in range(len(cfg.vifs))],
            accel=accel,
            key=key,
        )

    def _disks_in_use(self, exclude: RunningDomain | None = None) -> list[tuple[str, str]]:
        everyone = [*self.domains.values(), *(i.dom for i in self.incoming.values())]
        return [
            (d.name, resolve_disk(disk, self.host.storage_roots))
            for d in everyone
            if d is not exclude
            for disk in d.record.config.disks
        ]

    def _acquire_leases(self, cfg: DomainConfig) -> list[str]:
        taken: list[str] = []
        try:
            for disk in cfg.disks:
                if disk.writable and not disk.is_url:
                    lease.acquire(disk.path, self.host.name, cfg.name)
                    taken.append(disk.path)
        except StorageError:
            for path in taken:
                lease.release(path, self.host.name)
            raise
        return taken

    def _release_leases(self, record: DomainRecord) -> None:
        for path in record.leases:
            try:
                lease.release(path, self.host.name)
            except StorageError as err:
                log.error("%s", err)

    def _check_memory(self, cfg: DomainConfig) -> None:
        available = _mem_available_mib()
        needed = cfg.memory + self.host.dom0_min_mem
        if available is not None and needed > available:
            raise HypervisorError(
                f"{cfg.memory} MiB of memory requested but only {available} MiB is available "
                f"({self.host.dom0_min_mem} MiB kept for the host)"
            )

    def _next_domid(self) -> int:
        counter = self.layout.domid_counter
        try:
            last = int(counter.read_text())
        except (OSError, ValueError):
            last = 0
        everyone = [*self.domains.values(), *(i.dom for i in self.incoming.values())]
        used = {d.record.domid for d in everyone}
        domid = last + 1
        while domid in used:
            domid += 1
        counter.write_text(str(domid))
        return domid

    async def _launch(
        self, record: DomainRecord, boot: BootFiles, incoming: bool = False
    ) -> RunningDomain:
        """Start QEMU for ``record``; undo everything on failure."""
        cfg = record.config
        paths = self.layout.machine_paths(record.key)
        paths.run_dir.mkdir(parents=True, exist_ok=True)
        paths.log_dir.mkdir(parents=True, exist_ok=True)
        monitor = Monitor(cfg.name)
        verb = "receive" if incoming else "create"
        try:
            for name, vif in zip(record.taps, cfg.vifs, strict=True):
                await asyncio.to_thread(tap.create_tap, name, vif.bridge)
            args = build_qemu_args(
                cfg,
                qemu_binary=self.host.qemu_binary,
                accel=record.accel,
                boot=boot,
                paths=paths,
                taps=record.taps,
                incoming=incoming,
            )
            log.debug("launching %s", args)
            record.pid = await process.launch_detached(
                args, paths.qemu_log, paths.pidfile, LAUNCH_TIMEOUT
            )
            record.save(self.layout.record_file(record.key))
            await monitor.connect(paths.qmp_socket, QMP_TIMEOUT)
        except (FerryError, OSError) as err:
            await monitor.close()
            if record.pid is not None:
                await process.terminate(record.pid, 0)
            await asyncio.to_thread(self._cleanup_files, record, paths)
            if isinstance(err, FerryError):
                raise type(err)(f"cannot {verb} domain '{cfg.name}': {err}") from err
            raise HypervisorError(f"cannot {verb} domain '{cfg.name}': {err}") from err
        return RunningDomain(record=record, paths=paths, monitor=monitor)

    # -- lifecycle requests --------------------------------------------------

    async def pause(self, name: str) -> None:
        dom = self.get(name)
        async with dom.lock:
            new = next_state(name, dom.record.state, Event.PAUSE)
            await dom.monitor.execute("stop")
            self._set_state(dom, new)

    async def unpause(self, name: str) -> None:
        dom = self.get(name)
        async with dom.lock:
            new = next_state(name, dom.record.state, Event.UNPAUSE)
            await dom.monitor.execute("cont")
            self._set_state(dom, new)

    async def shutdown(self, name: str, wait: bool, timeout: float) -> dict[str, Any]:
        """ACPI power button; with ``wait``, until the guest has powered off."""
        dom = self.get(name)
        async with dom.lock:
            next_state(name, dom.record.state, Event.SHUTDOWN)
            if dom.record.state is DomainState.PAUSED:
                raise FerryError(
                    f"cannot shut down domain '{name}': it is paused and cannot see the "
                    "power button; unpause it or use destroy"
                )
            await dom.monitor.execute("system_powerdown")
        if not wait:
            return {"ended": False}
        assert dom.record.pid is not None
        if not await process.wait_exit(dom.record.pid, timeout):
            raise HypervisorError(
                f"domain '{name}' did not power off within {timeout:.0f} s of the ACPI "
                "power button; it is still running (use destroy to force it off)"
            )
        if dom.watcher is not None:
            await asyncio.shield(dom.watcher)
        return {"ended": True}

    async def destroy(self, name: str) -> None:
        dom = self.get(name)
        async with dom.lock:
            next_state(name, dom.record.state, Event.SHUTDOWN)
            dom.ending = True
            with contextlib.suppress(QmpError):
                await dom.monitor.execute("quit", timeout=DESTROY_GRACE)
            assert dom.record.pid is not None
            if not await process.wait_exit(dom.record.pid, DESTROY_GRACE):
                await process.terminate(dom.record.pid, DESTROY_GRACE)
        if dom.watcher is not None:
            await asyncio.shield(dom.watcher)

    def console_socket(self, name: str) -> str:
        return str(self.get(name).paths.console_socket)

    # -- migration: source side ------------------------------------------------

    async def migrate(
        self,
        name: str,
        host: str,
        port: int,
        params: MigrationParams,
        on_progress: ProgressCallback,
    ) -> dict[str, Any]:
        dom = self.get(name)
        async with dom.lock:
            self._set_state(dom, next_state(name, dom.record.state, Event.MIGRATE_OUT))
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
            local_host=self.host.name,
            disks=facts,
            boot=boot,
            on_progress=on_progress,
        )
        dom.outgoing = out
        dom.record.migration_id = out.migration_id
        dom.record.migration_target = f"{host}:{port}"
        self._set_state(dom, dom.record.state)
        try:
            result = await out.run()
        except MigrationInDoubt:
            self._background(self._resolve_in_doubt(dom, resume=True))
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
        dom = self.get(name)
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
        self._set_state(dom, next_state(dom.name, dom.record.state, event))

    async def _hand_over(self, dom: RunningDomain) -> None:
        """The target runs the domain now: end our copy, keep its disks' leases theirs."""
        dom.handed_over = True
        dom.ending = True
        self._set_state(dom, next_state(dom.name, dom.record.state, Event.MIGRATE_OUT_DONE))
        with contextlib.suppress(QmpError):
            await dom.monitor.execute("quit", timeout=DESTROY_GRACE)
        assert dom.record.pid is not None
        if not await process.wait_exit(dom.record.pid, DESTROY_GRACE):
            await process.terminate(dom.record.pid, DESTROY_GRACE)
        if dom.watcher is not None:
            await asyncio.shield(dom.watcher)

    async def _resolve_in_doubt(self, dom: RunningDomain, resume: bool) -> None:
        """Ask the target, until it answers, whether it resumed the domain."""
        from ferry.migration.resolve import ask_outcome

        target = dom.record.migration_target or ""
        host, _, port = target.rpartition(":")
        mid = str(dom.record.migration_id)
        delay = 1.0
        while True:
            try:
                outcome = await ask_outcome(host, int(port), mid, self.host.name)
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
                if held is None or held.host != self.host.name:
                    raise StorageError(
                        f"cannot migrate '{dom.name}': this host does not hold the lease of "
                        f"disk {disk.path}"
                    )
                fact["lease_token"] = held.token
            facts.append(fact)
        return facts

    def _boot_facts(self, cfg: DomainConfig) -> dict[str, Any]:
        boot = self.boot_files(cfg)
        return {
            "kernel_sha256": self._digest(boot.kernel),
            "initrd_sha256": self._digest(boot.initrd) if boot.initrd else None,
        }

    def _digest(self, path: Path) -> str:
        import hashlib

        stat = path.stat()
        key = (str(path), stat.st_mtime_ns)
        if key not in self._digests:
            self._digests[key] = hashlib.sha256(path.read_bytes()).hexdigest()
        return self._digests[key]

    # -- migration: target side ------------------------------------------------

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
        where = f"host {self.host.name} refuses domain '{cfg.name}'"
        async with self._create_lock:
            local = self.domains.get(cfg.name)
            if local is not None and local.record.migration_id != migration_id:
                raise MigrationRefused(f"{where}: a domain of that name already runs there")
            if any(i.dom.name == cfg.name for i in self.incoming.values()):
                raise MigrationRefused(f"{where}: it is already arriving from another migration")
            try:
                check_disks(cfg, self.host.storage_roots, self._disks_in_use(exclude=local))
                await self._check_same_disks(cfg, disks)
                await asyncio.to_thread(tap.check_bridges, [v.bridge for v in cfg.vifs])
                self._check_memory(cfg)
                boot_files = self.boot_files(cfg)
                self._check_same_boot(cfg, boot)
                accel = (await self.accel(boot_files)).accel
            except FerryError as err:
                raise MigrationRefused(f"{where}: {err}") from err
            record = self._new_record(cfg, accel, key=f"{cfg.name}@{migration_id[:8]}")
            record.migration_id = migration_id
            record.state = next_state(cfg.name, record.state, Event.MIGRATE_IN)
            dom = await self._launch(record, boot_files, incoming=True)
            dom.record.save(self.layout.record_file(record.key))
            token = secrets.token_hex(16)
            self.incoming[migration_id] = Incoming(migration_id, dom, token, peer)
            dom.watcher = asyncio.create_task(self._watch(dom))
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
        files = self.boot_files(cfg)
        if boot.get("kernel_sha256") != self._digest(files.kernel):
            raise ImageError(f"kernel {files.kernel} differs from the source's")
        want = boot.get("initrd_sha256")
        if want is not None and (files.initrd is None or want != self._digest(files.initrd)):
            raise ImageError(f"initrd {files.initrd} differs from the source's")

    async def start_incoming_stream(self, migration_id: str, token: str, fd: int) -> None:
        arriving = self.incoming.get(migration_id)
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
        arriving = self.incoming.get(migration_id)
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
        self.outcomes[migration_id] = "committed"
        del self.incoming[migration_id]
        loaded_ts = _event_time(arriving.events, "completed")
        if arriving.events is not None:
            dom.monitor.unwatch(arriving.events)
        commit = Event.MIGRATE_IN_COMMIT if resume else Event.MIGRATE_IN_COMMIT_PAUSED
        dom.record.state = next_state(dom.name, dom.record.state, commit)
        dom.record.started_at = time.time()
        dom.record.leases = [d.path for d in dom.record.config.disks if d.writable and not d.is_url]
        self._set_state(dom, dom.record.state)
        for path in dom.record.leases:
            held = lease.read_lease(path)
            lease.write_lease(path, self.host.name, dom.name, held.token if held else None)
        self.domains[dom.name] = dom
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
        arriving = self.incoming.pop(migration_id, None)
        self.outcomes.setdefault(migration_id, "aborted")
        if arriving is None:
            return
        dom = arriving.dom
        log.info("aborting incoming %s (migration %s): %s", dom.name, migration_id[:8], reason)
        dom.ending = True
        dom.handed_over = True  # the leases were never ours
        with contextlib.suppress(QmpError):
            await dom.monitor.execute("quit", timeout=DESTROY_GRACE)
        assert dom.record.pid is not None
        if not await process.wait_exit(dom.record.pid, DESTROY_GRACE):
            await process.terminate(dom.record.pid, DESTROY_GRACE)
        if dom.watcher is not None:
            await asyncio.shield(dom.watcher)

    def migration_outcome(self, migration_id: str) -> str:
        if migration_id in self.incoming:
            return "pending"
        return self.outcomes.get(migration_id, "aborted")

    # -- watching and cleaning up --------------------------------------------

    def _set_state(self, dom: RunningDomain, state: DomainState) -> None:
        dom.record.state = state
        dom.record.save(self.layout.record_file(dom.record.key))

    async def _watch(self, dom: RunningDomain) -> None:
        assert dom.record.pid is not None
        events = asyncio.create_task(self._follow_events(dom))
        try:
            while not await process.wait_exit(dom.record.pid, 3600):
                pass
        finally:
            # Cancelled means ferryd is leaving: the domain lives on, untouched.
            events.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await events
            await dom.monitor.close()
        await self._ended(dom)

    async def _follow_events(self, dom: RunningDomain) -> None:
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
                    self._set_state(dom, _state_from_qmp(status, dom.record.state))

    async def _crashed(self, dom: RunningDomain) -> None:
        async with dom.lock:
            self._set_state(dom, next_state(dom.name, dom.record.state, Event.CRASH))
            log.warning("domain %s crashed (on_crash=%s)", dom.name, dom.record.config.on_crash)
            if dom.record.config.on_crash == "restart":
                await dom.monitor.execute("system_reset")
                await dom.monitor.execute("cont")
                self._set_state(dom, next_state(dom.name, dom.record.state, Event.RESTART))

    async def _ended(self, dom: RunningDomain) -> None:
        log.info("domain %s (id %d) ended", dom.name, dom.record.domid)
        if self.domains.get(dom.name) is dom:
            del self.domains[dom.name]
        for mid, arriving in list(self.incoming.items()):
            if arriving.dom is dom:
                del self.incoming[mid]
                self.outcomes.setdefault(mid, "aborted")
        if not dom.handed_over:
            self._release_leases(dom.record)
        await asyncio.to_thread(self._cleanup_files, dom.record, dom.paths)

    def _cleanup_files(self, record: DomainRecord, paths: MachinePaths) -> None:
        """Remove the taps, run files and record of a domain whose QEMU has ended.

        Blocking (netlink): call it in a thread from the event loop.
        """
        for name in record.taps:
            try:
                tap.delete_tap(name)
            except FerryError as err:
                log.error("%s", err)
        shutil.rmtree(paths.run_dir, ignore_errors=True)
        with contextlib.suppress(FileNotFoundError):
            self.layout.record_file(record.key).unlink()

    async def close(self) -> None:
        """Stop watching (ferryd is exiting); the QEMUs keep running.

        Except arriving ones: nobody will be left here to commit them.
        """
        for mid in list(self.incoming):
            await self.abort_incoming(mid, "ferryd is stopping")
        for dom in [*self.domains.values(), *(i.dom for i in self.incoming.values())]:
            if dom.watcher is not None:
                dom.watcher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await dom.watcher
            await dom.monitor.close()


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
    import json

    return int(json.loads(out)["virtual-size"])


def _state_from_qmp(status: Any, fallback: DomainState) -> DomainState:
    if not isinstance(status, dict):
        return fallback
    qemu_state = status.get("status")
    if qemu_state == "running":
        return DomainState.RUNNING
    if qemu_state == "guest-panicked":
        return DomainState.CRASHED
    if qemu_state in ("paused", "suspended"):
        return DomainState.PAUSED
    return fallback


def _mem_available_mib() -> int | None:
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) // 1024
    return None


def guest_boot_files(image_lookup: Callable[[], Any]) -> BootFilesProvider:
    """Boot files from the config, or ferry's own guest kernel when it names none."""

    def provide(cfg: DomainConfig) -> BootFiles:
        if cfg.kernel is not None:
            kernel = Path(cfg.kernel)
            if not kernel.is_file():
                raise ImageError(f"kernel {cfg.kernel} does not exist")
            initrd = Path(cfg.ramdisk) if cfg.ramdisk else None
            if initrd is not None and not initrd.is_file():
                raise ImageError(f"ramdisk {cfg.ramdisk} does not exist")
            return BootFiles(kernel, initrd)
        image = image_lookup()
        return BootFiles(Path(image.kernel), Path(image.initrd))

    return provide
