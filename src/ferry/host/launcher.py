"""Starting and ending QEMU for a domain, and what goes with it: taps, run files, leases,
and the domain's ownership in the cluster store.

The launcher owns the machine-level resources of a domain; the table owns
its state. A launch that fails halfway undoes what it made.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import shutil
import time
from collections.abc import Collection, Sequence
from pathlib import Path

from ferry.cluster.keys import disk_id
from ferry.cluster.ownership import LocalOwnership, Ownership
from ferry.config.host import HostConfig
from ferry.domain.config import FERRY_KERNEL, DomainConfig
from ferry.domain.state import DomainState
from ferry.errors import (
    ClusterError,
    FerryError,
    HypervisorError,
    ImageError,
    QmpError,
    StorageError,
)
from ferry.host.layout import HostLayout
from ferry.host.record import DomainRecord
from ferry.host.running import BootFilesProvider, RunningDomain
from ferry.hypervisor import process
from ferry.hypervisor.accel import ProbeResult, resolve_accel
from ferry.hypervisor.cmdline import BootFiles, MachinePaths, build_qemu_args
from ferry.hypervisor.firmware import ensure_vars
from ferry.hypervisor.monitor import Monitor
from ferry.hypervisor.seed import build_seed
from ferry.network import tap
from ferry.storage import lease
from ferry.storage.disks import resolve_disk

log = logging.getLogger("ferryd")

LAUNCH_TIMEOUT = 60.0
# Kernels and initrds are tens of MiB; anything far larger is not one.
MAX_BOOT_FILE = 512 << 20
QMP_TIMEOUT = 10.0
DESTROY_GRACE = 5.0
# What the accelerator probe boots, whatever the domains boot: ferry's own
# kernel, whose initramfs answers the probe.
PROBE_CONFIG = DomainConfig(name="ferry-accel-probe", kernel=FERRY_KERNEL)


class Launcher:
    def __init__(
        self,
        host: HostConfig,
        layout: HostLayout,
        boot_files: BootFilesProvider,
        accel_cache: Path | None = None,
        boot_dirs: Sequence[Path] = (),
        ownership: Ownership | None = None,
    ) -> None:
        self.host = host
        # Who runs what: etcd in a cluster, this host alone when standalone.
        self.ownership: Ownership = ownership or LocalOwnership(host.name)
        self.layout = layout
        self.boot_files = boot_files
        # Where a kernel or initrd named by a migration's source may come from:
        # ferry's own image directory, never a path a peer chose.
        self.boot_dirs = tuple(Path(os.path.realpath(d)) for d in boot_dirs)
        # The probe's verdict is a property of the machine, not of one daemon's
        # state: shared by every ferryd on it, it costs one probe per machine.
        self.accel_cache = accel_cache or layout.state_dir / "accel-probe.json"
        self._accel: ProbeResult | None = None
        self._digests: dict[tuple[str, int], str] = {}

    async def accel(self) -> ProbeResult:
        """KVM or TCG, probed once (with ferry's own guest kernel) when ``auto``."""
        if self._accel is None:
            probe = BootFiles(None)
            if self.host.accel == "auto":
                try:
                    probe = self.boot_files(PROBE_CONFIG)
                except ImageError as err:
                    raise ImageError(
                        f"accel = auto probes KVM by booting ferry's guest image: {err} "
                        "(build it, or set accel in the host config)"
                    ) from err
            self._accel = await resolve_accel(
                self.host.accel,
                self.host.qemu_binary,
                probe.kernel or Path("/nonexistent"),
                probe.initrd or probe.kernel or Path("/nonexistent"),
                self.accel_cache,
            )
            log.info("accelerator: %s (%s)", self._accel.accel, self._accel.reason)
        return self._accel

    def check_memory(self, cfg: DomainConfig, promised_mib: int = 0) -> None:
        """Refuse a domain the host cannot hold, counting what is already promised."""
        available = _mem_available_mib()
        needed = cfg.memory + self.host.dom0_min_mem + promised_mib
        if available is not None and needed > available:
            raise HypervisorError(
                f"{cfg.memory} MiB of memory requested but only {available} MiB is available "
                f"({self.host.dom0_min_mem} MiB kept for the host, {promised_mib} MiB "
                "promised to its domains)"
            )

    async def file_digest(self, path: Path) -> str:
        """sha256 of a boot file, hashed in a thread (never in the event loop), cached."""
        stat = path.stat()
        if stat.st_size > MAX_BOOT_FILE:
            raise ImageError(
                f"{path} is larger than a boot file may be ({MAX_BOOT_FILE >> 20} MiB)"
            )
        key = (str(path), stat.st_mtime_ns)
        if key not in self._digests:
            self._digests[key] = await asyncio.to_thread(_sha256, path)
        return self._digests[key]

    def in_boot_dirs(self, path: Path) -> bool:
        real = Path(os.path.realpath(path))
        return any(real.is_relative_to(d) for d in self.boot_dirs)

    def new_record(self, cfg: DomainConfig, accel: str, key: str, domid: int) -> DomainRecord:
        return DomainRecord(
            config=cfg,
            domid=domid,
            state=DomainState.SHUTOFF,
            started_at=time.time(),
            taps=[tap.tap_name(domid, i) for i in range(len(cfg.vifs))],
            accel=accel,
            key=key,
        )

    # -- ownership and leases --------------------------------------------------

    def owned_disks(self, cfg: DomainConfig, new: Collection[str] = ()) -> list[str]:
        """The disks ``cfg`` writes, by their cluster-wide id (checked disks only;
        ``new``: paths of disks still to be made here, by a --copy-storage migration)."""
        roots = self.host.storage_roots
        return [
            disk_id(os.path.realpath(d.path) if d.path in new else resolve_disk(d, roots))
            for d in cfg.disks
            if d.writable
        ]

    async def claim(
        self, cfg: DomainConfig, taken_in_store: bool = False
    ) -> tuple[list[str], list[str]]:
        """Own the domain and the disks it writes, in the cluster, then by lease file.

        All or nothing: a refusal names who has what and leaves nothing taken.
        Returns the owned disk ids and the lease files, for the domain's record.
        ``taken_in_store``: an HA restart already owns it in etcd, which proves
        the old host fenced; its lease files, left behind, are taken over.
        """
        disks = self.owned_disks(cfg)
        if not taken_in_store:
            ha = self.ownership.arm_ha(cfg.to_mapping()) if cfg.on_host_failure == "restart" else []
            await self.ownership.take(cfg.name, disks, also=ha)
        try:
            return disks, self.acquire_leases(cfg, take_over=taken_in_store)
        except StorageError:
            await self._disown(cfg.name, disks)
            raise

    async def release(self, record: DomainRecord) -> None:
        """Give up what :meth:`claim` took (what this host still holds of it)."""
        self.release_leases(record)
        await self._disown(record.config.name, record.owned_disks)

    async def _disown(self, name: str, disks: list[str]) -> None:
        try:
            await self.ownership.release(name, disks)
        except ClusterError as err:
            log.error(
                "domain %s is not running here but etcd may still name this host its owner "
                "(%s); the key goes when this host's lease does",
                name, err,
            )  # fmt: skip

    def acquire_leases(self, cfg: DomainConfig, take_over: bool = False) -> list[str]:
        taken: list[str] = []
        try:
            for disk in cfg.disks:
                if disk.writable and not disk.is_url:
                    if take_over:
                        lease.write_lease(disk.path, self.host.name, cfg.name)
                    else:
                        lease.acquire(disk.path, self.host.name, cfg.name)
                    taken.append(disk.path)
        except StorageError:
            for path in taken:
                lease.release(path, self.host.name)
            raise
        return taken

    def release_leases(self, record: DomainRecord) -> None:
        for path in record.leases:
            try:
                lease.release(path, self.host.name)
            except StorageError as err:
                log.error("%s", err)

    # -- QEMU ------------------------------------------------------------------

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
            if boot.uefi is not None:
                await asyncio.to_thread(ensure_vars, boot.uefi.vars, boot.uefi.vars_template)
            seed = cfg.seed_files()
            if seed is not None:
                await asyncio.to_thread(build_seed, seed, paths.seed)
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
        except BaseException as err:
            # Cancelled too: a QEMU started for nobody must not outlive its launch.
            await monitor.close()
            if record.pid is not None:
                await process.terminate(record.pid, 0)
            await asyncio.to_thread(self.cleanup_files, record, paths)
            if isinstance(err, FerryError):
                raise type(err)(f"cannot {verb} domain '{cfg.name}': {err}") from err
            if isinstance(err, OSError):
                raise HypervisorError(f"cannot {verb} domain '{cfg.name}': {err}") from err
            raise
        return RunningDomain(record=record, paths=paths, monitor=monitor)

    async def end_qemu(self, dom: RunningDomain) -> None:
        """Soft (QMP quit) then hard; returns once the domain is cleaned up."""
        dom.ending = True
        with contextlib.suppress(QmpError):
            await dom.monitor.execute("quit", timeout=DESTROY_GRACE)
        if not await process.wait_exit(dom.pid, DESTROY_GRACE):
            await process.terminate(dom.pid, DESTROY_GRACE)
        if dom.watcher is not None:
            await asyncio.shield(dom.watcher)

    def cleanup_files(self, record: DomainRecord, paths: MachinePaths) -> None:
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


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _mem_available_mib() -> int | None:
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) // 1024
    return None
