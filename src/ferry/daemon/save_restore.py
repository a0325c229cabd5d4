"""``ferry save`` and ``ferry restore``, as xm had them: a domain's memory to a file and back.

QEMU writes and reads the stream itself, through a descriptor of the file
(``fd:`` migration): no guest memory passes through Python. ferryd writes the
header (``ferry.storage.save_file``) and checks it, and the stream's
checksum, before any QEMU starts on a restore.

Save pauses the domain, streams it, and once the file is complete and durable
ends the domain here (its ownership released, so another host may restore it).
A save that fails at any point removes the partial file and leaves the domain
as it was, running or paused. Restore takes ownership as ``create`` does, on
any host that sees the disks; it checks that the disks are the same size and
format and the boot files the same as when saved. The disks themselves are not
in the file: between a save and its restore they must not change, as under xm.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from pathlib import Path
from typing import Any

from ferry.daemon.lifecycle import Lifecycle
from ferry.domain.config import DomainConfig
from ferry.domain.state import DomainState, Event
from ferry.errors import FerryError, InvalidTransition, StorageError
from ferry.host.launcher import Launcher
from ferry.host.running import RunningDomain
from ferry.host.table import DomainTable
from ferry.hypervisor.monitor import Monitor
from ferry.migration.sameness import SameDomain, boot_facts
from ferry.migration.switchover import stream_status
from ferry.storage import images, save_file
from ferry.util.wait import wait_until

log = logging.getLogger("ferryd")

FD_NAME = "ferry-save"
STREAM_TIMEOUT = 1800.0
# Whatever an earlier migration left set on this QEMU is set back: the file
# takes one plain stream, at full speed.
_PLAIN = {
    "multifd": False, "postcopy-ram": False, "pause-before-switchover": False,
    "xbzrle": False, "auto-converge": False, "events": True,
}  # fmt: skip
_PARAMETERS = {"tls-creds": "", "tls-hostname": "", "tls-authz": "", "max-bandwidth": 1 << 40}


class SaveRestore:
    def __init__(self, table: DomainTable, launcher: Launcher, lifecycle: Lifecycle) -> None:
        self.table = table
        self.launcher = launcher
        self.lifecycle = lifecycle
        self.host = launcher.host

    async def save(self, name: str, path: str) -> dict[str, Any]:
        dom = self.table.get(name)
        target = Path(path)
        began = time.monotonic()
        async with dom.lock:
            running = dom.record.state is DomainState.RUNNING
            if not running and dom.record.state is not DomainState.PAUSED:
                raise InvalidTransition(
                    f"cannot save domain '{name}': it is {dom.record.state.value}"
                )
            cfg = dom.record.config
            header = save_file.SaveHeader(
                config=cfg.to_mapping(), running=running, host=self.host.name,
                saved_at=time.time(), disks=await self._disk_facts(cfg),
                boot=await boot_facts(self.launcher, cfg), qemu=await _version(dom.monitor),
            )  # fmt: skip
            fd = await asyncio.to_thread(save_file.create, target)
            try:
                if running:
                    await dom.monitor.execute("stop")
                    self.table.transition(dom, Event.PAUSE)
                await _plain_stream(dom.monitor)
                await dom.monitor.pass_fd(fd, FD_NAME)
                await dom.monitor.execute("migrate", {"uri": f"fd:{FD_NAME}"})
                await _finished(dom.monitor, f"the save of '{name}'")
                header = await asyncio.to_thread(save_file.finish, fd, target, header)
            except BaseException as err:
                await self._undo_save(dom, target, running, err)
                raise
            finally:
                os.close(fd)
            # The file is whole and durable: the domain lives in it now.
            await self.launcher.end_qemu(dom)
        took = round(time.monotonic() - began, 2)
        log.info("domain %s saved to %s (%d bytes, %.2f s)", name, path, header.stream_bytes, took)
        return {"name": name, "path": path, "bytes": header.stream_bytes, "seconds": took}

    async def _undo_save(
        self, dom: RunningDomain, target: Path, running: bool, err: BaseException
    ) -> None:
        """The domain as it was; no partial file left."""
        log.warning("save of %s failed, the domain is kept: %s", dom.name, err)
        with contextlib.suppress(FerryError):
            if await stream_status(dom.monitor) in ("active", "setup"):
                await dom.monitor.execute("migrate_cancel")
                await _finished(dom.monitor, "the cancel", accept=("cancelled", "failed"))
        with contextlib.suppress(FileNotFoundError):
            target.unlink()
        if running and dom.record.state is DomainState.PAUSED:
            # After a completed stream the disks were handed off: cont takes them back.
            await dom.monitor.execute("cont")
            self.table.transition(dom, Event.UNPAUSE)

    async def _disk_facts(self, cfg: DomainConfig) -> list[dict[str, Any]]:
        facts = []
        for disk in cfg.disks:
            image = await images.inspect(
                disk, self.host.storage_roots, self.host.storage_servers, share=True
            )
            facts.append({"path": disk.path, "size": image.virtual_size, "format": image.format})
        return facts

    # -- restore ---------------------------------------------------------------

    async def restore(self, path: str) -> dict[str, Any]:
        began = time.monotonic()
        fd, header = await asyncio.to_thread(save_file.open_checked, Path(path))
        try:
            cfg = DomainConfig.from_mapping(header.config, f"domain config in {path}")
            try:
                await self._same_disks(cfg, header.disks)
                await SameDomain(self.launcher).boot(cfg, header.boot)
            except FerryError as err:
                raise type(err)(f"cannot restore '{cfg.name}' from {path}: {err}") from err

            async def load(dom: RunningDomain) -> None:
                await _plain_stream(dom.monitor, incoming=True)
                await dom.monitor.pass_fd(fd, FD_NAME)
                await dom.monitor.execute("migrate-incoming", {"uri": f"fd:{FD_NAME}"})
                await _finished(dom.monitor, f"the restore of '{cfg.name}'")
                if header.running:
                    await dom.monitor.execute("cont")

            created = await self.lifecycle.create(
                header.config, load=load, paused=not header.running
            )
        finally:
            os.close(fd)
        took = round(time.monotonic() - began, 2)
        log.info("domain %s restored from %s (%.2f s)", cfg.name, path, took)
        return created | {"path": path, "running": header.running, "seconds": took}

    async def _same_disks(self, cfg: DomainConfig, facts: list[Any]) -> None:
        if len(facts) != len(cfg.disks):
            raise StorageError("its header lists another number of disks than its config")
        for disk, fact in zip(cfg.disks, facts, strict=True):
            here = await images.inspect(disk, self.host.storage_roots, self.host.storage_servers)
            saved = (fact.get("size"), fact.get("format")) if isinstance(fact, dict) else None
            if saved != (here.virtual_size, here.format):
                raise StorageError(
                    f"disk {disk.path} is a {here.virtual_size}-byte {here.format} image here, "
                    f"not the one saved with the domain ({saved})"
                )


async def _plain_stream(monitor: Monitor, incoming: bool = False) -> None:
    caps = _PLAIN | ({"late-block-activate": True} if incoming else {})
    await monitor.execute(
        "migrate-set-capabilities",
        {"capabilities": [{"capability": k, "state": v} for k, v in caps.items()]},
    )
    if not incoming:
        await monitor.execute("migrate-set-parameters", _PARAMETERS)


async def _finished(monitor: Monitor, what: str, accept: tuple[str, ...] = ("completed",)) -> None:
    async def ended() -> str | None:
        status = await stream_status(monitor)
        return status if status in ("completed", "failed", "cancelled") else None

    status = await wait_until(ended, timeout=STREAM_TIMEOUT, what=what, interval=0.05)
    if status not in accept:
        info = await monitor.execute("query-migrate")
        why = info.get("error-desc", status) if isinstance(info, dict) else status
        raise StorageError(f"{what} failed in QEMU: {why}")


async def _version(monitor: Monitor) -> str:
    info = await monitor.execute("query-version")
    qemu = info.get("qemu", {}) if isinstance(info, dict) else {}
    return f"{qemu.get('major')}.{qemu.get('minor')}.{qemu.get('micro')}"
