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
import hashlib
import logging
import shutil
import time
from collections.abc import Callable, Coroutine, Mapping
from pathlib import Path
from typing import Any

from ferry.config.host import HostConfig
from ferry.daemon.incoming import IncomingMigrations
from ferry.daemon.layout import HostLayout
from ferry.daemon.outgoing import OutgoingMigrations
from ferry.daemon.record import DomainRecord, load_record
from ferry.daemon.running import BootFilesProvider, Incoming, RunningDomain
from ferry.domain.config import DomainConfig
from ferry.domain.state import DomainState, Event, next_state
from ferry.errors import (
    DomainExists,
    DomainNotFound,
    FerryError,
    HypervisorError,
    ImageError,
    QmpError,
    StorageError,
)
from ferry.hypervisor import process
from ferry.hypervisor.accel import ProbeResult, resolve_accel
from ferry.hypervisor.cmdline import BootFiles, MachinePaths, build_qemu_args
from ferry.hypervisor.monitor import Monitor
from ferry.network import tap
from ferry.storage import lease
from ferry.storage.disks import check_disks, resolve_disk

log = logging.getLogger("ferryd")

LAUNCH_TIMEOUT = 60.0
QMP_TIMEOUT = 10.0
DESTROY_GRACE = 5.0


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
        self.create_lock = asyncio.Lock()
        self._digests: dict[tuple[str, int], str] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self.outgoing = OutgoingMigrations(self)
        self.arrivals = IncomingMigrations(self)
        self._accel: ProbeResult | None = None

    def background(self, work: Coroutine[Any, Any, None]) -> None:
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
        dom.watcher = asyncio.create_task(self.watch(dom))
        log.info("re-attached domain %s (pid %d, %s)", name, pid, record.state.value)

    async def _recover_outgoing(self, dom: RunningDomain, status: dict[str, Any]) -> None:
        """ferryd died while migrating this domain out: finish or undo it safely."""
        info = await dom.monitor.execute("query-migrate")
        qemu_state = info.get("status") if isinstance(info, dict) else None
        if qemu_state == "completed" and dom.record.migration_id:
            # The target may have resumed it: only the target can say.
            dom.record.state = DomainState.MIGRATING_OUT
            self.background(self.outgoing.resolve_in_doubt(dom, resume=True))
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
        async with self.create_lock:
            if cfg.name in self.domains or any(
                i.dom.name == cfg.name for i in self.incoming.values()
            ):
                raise DomainExists(
                    f"cannot create domain '{cfg.name}': a domain of that name is already "
                    f"running on host {self.host.name}"
                )
            try:
                check_disks(cfg, self.host.storage_roots, self.disks_in_use())
                await asyncio.to_thread(tap.check_bridges, [v.bridge for v in cfg.vifs])
                self.check_memory(cfg)
                boot = self.boot_files(cfg)
                accel = (await self.accel(boot)).accel
                leases = self._acquire_leases(cfg)
            except FerryError as err:
                raise type(err)(f"cannot create domain '{cfg.name}': {err}") from err
            record = self.new_record(cfg, accel, key=cfg.name)
            record.leases = leases
            try:
                dom = await self.launch(record, boot)
            except FerryError:
                self._release_leases(record)
                raise
            self.set_state(dom, next_state(cfg.name, record.state, Event.START))
            self.domains[cfg.name] = dom
            dom.watcher = asyncio.create_task(self.watch(dom))
        log.info("created domain %s (id %d, pid %s, %s)", cfg.name, record.domid, record.pid, accel)
        return {"name": cfg.name, "id": record.domid, "accel": accel, "ignored": list(cfg.ignored)}

    def new_record(self, cfg: DomainConfig, accel: str, key: str) -> DomainRecord:
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

    def disks_in_use(self, exclude: RunningDomain | None = None) -> list[tuple[str, str]]:
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

    def check_memory(self, cfg: DomainConfig) -> None:
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

    async def launch(
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
            self.set_state(dom, new)

    async def unpause(self, name: str) -> None:
        dom = self.get(name)
        async with dom.lock:
            new = next_state(name, dom.record.state, Event.UNPAUSE)
            await dom.monitor.execute("cont")
            self.set_state(dom, new)

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
            await self.end_qemu(dom)

    async def end_qemu(self, dom: RunningDomain) -> None:
        """Soft (QMP quit) then hard; returns once the domain is cleaned up."""
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

    def file_digest(self, path: Path) -> str:
        stat = path.stat()
        key = (str(path), stat.st_mtime_ns)
        if key not in self._digests:
            self._digests[key] = hashlib.sha256(path.read_bytes()).hexdigest()
        return self._digests[key]

    # -- watching and cleaning up --------------------------------------------

    def set_state(self, dom: RunningDomain, state: DomainState) -> None:
        dom.record.state = state
        dom.record.save(self.layout.record_file(dom.record.key))

    async def watch(self, dom: RunningDomain) -> None:
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
                    self.set_state(dom, _state_from_qmp(status, dom.record.state))

    async def _crashed(self, dom: RunningDomain) -> None:
        async with dom.lock:
            self.set_state(dom, next_state(dom.name, dom.record.state, Event.CRASH))
            log.warning("domain %s crashed (on_crash=%s)", dom.name, dom.record.config.on_crash)
            if dom.record.config.on_crash == "restart":
                await dom.monitor.execute("system_reset")
                await dom.monitor.execute("cont")
                self.set_state(dom, next_state(dom.name, dom.record.state, Event.RESTART))

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
            await self.arrivals.abort_incoming(mid, "ferryd is stopping")
        for dom in [*self.domains.values(), *(i.dom for i in self.incoming.values())]:
            if dom.watcher is not None:
                dom.watcher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await dom.watcher
            await dom.monitor.close()


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
