"""The source's side of ``--copy-storage``: its disks mirrored into the target's while it runs.

libvirt's order, on QEMU 7.2 (verified here: the sequence below copies a
disk byte for byte, ``qemu-img compare`` says identical):

1. before the memory stream, each copied disk gets an NBD client node to the
   target's export (TLS, the target's name checked against its certificate)
   and a ``blockdev-mirror`` from the guest's disk into it (``sync: full``);
2. the memory stream starts once every mirror is ready (the bulk is copied);
3. QEMU stops the VM before its switch (``pause-before-switchover``); there
   each mirror is cancelled *softly*: on a ready mirror that is a completion
   that copies what is still dirty and leaves the target a point-in-time copy
   (with the VM stopped, the disk's final state), never a pivot: the source
   keeps writing its own disk until the commit;
4. the NBD nodes are removed (QEMU could not inactivate its disks for the
   switch with a writer still attached), and the stream is let through.

The mirror only reads the source's disk, so whatever fails, that disk is
intact. An abort ends QEMU's connections to the export first (QMP ``yank``:
each NBD node quits, never to reconnect): a request in flight on a cut link
would otherwise hold the cancel for as long as TCP retries.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import urllib.parse
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ferry.errors import FerryError, MigrationError, QmpError
from ferry.hypervisor import qemu_sockets
from ferry.hypervisor.monitor import Monitor
from ferry.pki.qemu_tls import QemuTls

log = logging.getLogger("ferryd")

JOB_PREFIX = "ferry-mirror-"
NODE_PREFIX = "ferry-mig-"
FINISH_TIMEOUT = 60.0
ABORT_TIMEOUT = 15.0
CONNECT_TIMEOUT = 30.0
YANK_TIMEOUT = 5.0
# Stopping the VM drains its writes in flight: quick, once the links are yanked.
HOLD_TIMEOUT = 15.0
# The final copy runs while the VM is stopped: every millisecond of waiting
# for it is downtime (a 50 ms poll was seen adding 50 ms to a switchover).
FINISH_POLL_S = 0.002
ABORT_POLL_S = 0.05
# A job's states while it still copies (query-jobs' status).
ALIVE = frozenset({"created", "running", "ready", "standby", "paused", "waiting", "pending"})


@dataclass(frozen=True)
class DiskProgress:
    """The mirrors together: bytes copied of what is to copy (which grows as the guest
    writes), and whether every mirror has caught up."""

    copied: int
    total: int
    ready: bool

    @property
    def remaining(self) -> int:
        return max(self.total - self.copied, 0)

    def to_wire(self) -> dict[str, Any]:
        return {"copied": self.copied, "total": self.total, "remaining": self.remaining,
                "ready": self.ready}  # fmt: skip


class DiskMirror:
    """Mirrors of the disks ``indices`` to the target's exports in ``storage``."""

    def __init__(
        self,
        monitor: Monitor,
        tls: QemuTls,
        target: str,
        address: str,
        storage: dict[str, Any],
        indices: Sequence[int],
        qemu_pid: int | None,
        sync_writes: bool = False,
        speed: int = 0,
    ) -> None:
        self.monitor = monitor
        self.tls = tls
        self.target = target  # the name the target's certificate must carry
        self.address = address  # where its relocation channel was reached
        self.port, self.exports = _storage(storage, indices, target)
        self.indices = list(indices)
        self.qemu_pid = qemu_pid
        self.copy_mode = "write-blocking" if sync_writes else "background"
        # A write-blocking mirror must never end by itself while the guest
        # writes through it (see _end_held): on an error (reading the source,
        # writing the target) it stops.
        self.on_error = "stop" if sync_writes else "report"
        self.speed = speed  # bytes/s each mirror may copy from its start (0: no cap)
        self._nodes: list[str] = []
        self._jobs: list[str] = []

    async def start(self) -> None:
        """Connect to every export and start every mirror (the bulk copy begins)."""
        await clear_leftovers(self.monitor, self.qemu_pid)
        creds = await self.tls.setup_nbd_client(self.monitor)
        for index in self.indices:
            node, job = f"{NODE_PREFIX}{index}", f"{JOB_PREFIX}{index}"
            # QEMU 7.2 connects and shakes hands inside the command, its main
            # loop held: on a dead link that is TCP's whole retry time.
            self._nodes.append(node)
            try:
                await self.monitor.execute(
                    "blockdev-add",
                    {
                        "driver": "nbd",
                        "node-name": node,
                        "server": {"type": "inet", "host": self.address, "port": str(self.port)},
                        "export": self.exports[index],
                        "tls-creds": creds,
                        "tls-hostname": self.target,
                    },
                    timeout=CONNECT_TIMEOUT,
                )
            except QmpError as err:
                if "got no answer" not in str(err):
                    self._nodes.remove(node)  # refused: nothing was added
                    raise
                # Stuck connecting: ending the connection frees QEMU's main loop.
                self._shut_links()
                raise MigrationError(
                    f"the copy of disk vd{chr(97 + index)}: no answer from {self.target}'s "
                    f"export within {CONNECT_TIMEOUT:.0f} s"
                ) from err
            await self.monitor.execute(
                "blockdev-mirror",
                {"job-id": job, "device": f"disk{index}", "target": node, "sync": "full",
                 "copy-mode": self.copy_mode, "on-source-error": self.on_error,
                 "on-target-error": self.on_error, "speed": self.speed,
                 "auto-finalize": True, "auto-dismiss": False},
            )  # fmt: skip
            self._jobs.append(job)

    async def progress(self) -> DiskProgress:
        """Where the mirrors are; MigrationError if one of them has failed."""
        jobs = await _jobs_now(self.monitor)
        stopped = await _stopped_on_error(self.monitor, jobs)
        copied = total = 0
        ready = True
        for job in self._jobs:
            info = jobs.get(job)
            status = info.get("status") if info else None
            if info is None or status not in ALIVE or info.get("error") or job in stopped:
                why = (info or {}).get("error") or (
                    "it stopped on an I/O error" if job in stopped
                    else f"its job is {status or 'gone'}"
                )  # fmt: skip
                raise MigrationError(
                    f"the copy of disk vd{chr(97 + int(job.rsplit('-', 1)[1]))} to "
                    f"{self.target} failed: {why}"
                )
            copied += int(info.get("current-progress", 0))
            total += int(info.get("total-progress", 0))
            ready = ready and status == "ready"
        return DiskProgress(copied, total, ready)

    @property
    def active(self) -> bool:
        """Mirrors are running (not yet finished or aborted)."""
        return bool(self._jobs)

    async def until_ready(
        self, tick: Callable[[DiskProgress], Awaitable[None]], stall_s: float, poll_s: float
    ) -> DiskProgress:
        """Until every mirror has caught up; ``tick`` each round; MigrationError on a stall."""
        last, changed = -1, time.monotonic()
        while True:
            disk = await self.progress()
            await tick(disk)
            if disk.ready:
                return disk
            now = time.monotonic()
            if disk.copied != last:
                last, changed = disk.copied, now
            elif now - changed > stall_s:
                raise MigrationError(
                    f"the copy of the disks to {self.target} made no progress for "
                    f"{stall_s:.0f} s: the link seems down"
                )
            await asyncio.sleep(poll_s)

    async def finish(self) -> DiskProgress:
        """With the VM stopped: the last dirty blocks copied, the mirrors and nodes gone."""
        last = await self.progress()
        if not last.ready:
            raise MigrationError(f"the copy of the disks to {self.target} is not caught up")
        for job in self._jobs:
            await self.monitor.execute("block-job-cancel", {"device": job, "force": False})
        jobs = await _concluded(self.monitor, self._jobs, FINISH_TIMEOUT, FINISH_POLL_S)
        for job in self._jobs:
            info = jobs.get(job)
            if info is None:
                # Never dismissed by QEMU itself (auto-dismiss off): someone else did.
                raise MigrationError(f"the final copy of a disk to {self.target}: its job vanished")
            if info.get("error") or info.get("current-progress") != info.get("total-progress"):
                raise MigrationError(
                    f"the final copy of a disk to {self.target} failed: "
                    f"{info.get('error') or 'it ended short of the disk'}"
                )
        done = DiskProgress(
            sum(int(jobs[j].get("current-progress", 0)) for j in self._jobs),
            sum(int(jobs[j].get("total-progress", 0)) for j in self._jobs),
            True,
        )
        await _remove(self.monitor, self._jobs, self._nodes)
        return done

    async def abort(self) -> None:
        """Stop copying at once; the target's copy is discarded. Never raises."""
        if not self._jobs and not self._nodes:
            return
        if not await _yank(self.monitor, self._nodes):
            self._shut_links()
        if self.copy_mode == "write-blocking":
            await _end_held(self.monitor, self._jobs, self._nodes)
        else:
            await _force_end(self.monitor, self._jobs, self._nodes)

    def _shut_links(self) -> None:
        """End QEMU's connections to the target's exports: a cut link then fails at
        once, rather than hold a cancel (or a connect) for as long as TCP retries."""
        if self.qemu_pid is not None:
            with contextlib.suppress(OSError, ValueError):
                fds = qemu_sockets.socket_fds_to_port(self.qemu_pid, self.port, self.address)
                qemu_sockets.shut_down(self.qemu_pid, list(fds))


async def clear_leftovers(monitor: Monitor, qemu_pid: int | None = None) -> None:
    """Mirrors and NBD nodes that a migration of this QEMU left behind (its ferryd
    died midway): ended, so that the domain runs on alone and a later copy can start.
    Their connections (where each node says it connects) are ended first, so a
    dead link does not hold the cancel. Never raises."""
    try:
        jobs = [j for j in await _jobs_now(monitor) if j.startswith(JOB_PREFIX)]
        found = await monitor.execute("query-named-block-nodes", {"flat": True})
    except QmpError as err:
        log.error("cannot look for disk mirrors left in '%s': %s", monitor.domain, err)
        return
    left = [
        n for n in (found if isinstance(found, list) else [])
        if isinstance(n, dict) and str(n.get("node-name", "")).startswith(NODE_PREFIX)
    ]  # fmt: skip
    nodes = [str(n["node-name"]) for n in left]
    if jobs or nodes:
        log.warning("domain %s: ending disk mirrors an earlier migration left: %s",
                    monitor.domain, ", ".join(jobs + nodes))  # fmt: skip
        for node in left:
            if not await _yank(monitor, [str(node["node-name"])]) and qemu_pid is not None:
                _shut_node_link(qemu_pid, str(node.get("file", "")))
        # Their copy mode is not known any more: ended as write-blocking ones are.
        await _end_held(monitor, jobs, nodes)


async def _end_held(monitor: Monitor, jobs: list[str], nodes: list[str]) -> None:
    """End write-blocking mirrors with the VM stopped for that moment.

    QEMU 7.2's mirror frees its in-flight bitmap as it ends, and a guest write
    still passing through it (a write-blocking mirror copies each write) then
    writes into freed memory (block/mirror.c, the end of mirror_run; read in
    7.2.22's source). Seen in the lab: the link cut with --sync-writes, the
    source QEMU died at the abort ("malloc(): unsorted double linked list
    corrupted") in 3 runs of 8, the VM lost. ``stop`` drains every write in
    flight (they fail at once, their connections yanked) and lets no new one
    in until ``cont``.
    """
    held = False
    if jobs:
        try:
            status = await monitor.execute("query-status")
            if isinstance(status, dict) and status.get("running"):
                await monitor.execute("stop", timeout=HOLD_TIMEOUT)
                held = True
        except QmpError as err:
            log.error("cannot stop '%s' to end its disk mirrors: %s", monitor.domain, err)
    try:
        await _force_end(monitor, jobs, nodes)
    finally:
        if held:
            try:
                await monitor.execute("cont")
            except QmpError as err:
                log.error("'%s' stopped to end its disk mirrors, not resumed: %s",
                          monitor.domain, err)  # fmt: skip


async def _yank(monitor: Monitor, nodes: list[str]) -> bool:
    """End the NBD nodes' connections the way QEMU means it (``yank``): each
    node quits for good, where a socket shut from outside leaves the node to
    try to reconnect on its next write (QEMU 7.2.22's block/nbd.c: an EIO
    leaves it CONNECTING_NOWAIT, a yank QUIT). False if QEMU did not yank
    them all (a node that never connected is not registered)."""
    if not nodes:
        return True
    instances = [{"type": "block-node", "node-name": node} for node in nodes]
    try:
        await monitor.execute("yank", {"instances": instances}, timeout=YANK_TIMEOUT)
    except QmpError as err:
        log.warning("yanking %s of '%s': %s", ", ".join(nodes), monitor.domain, err)
        return False
    return True


def _shut_node_link(qemu_pid: int, filename: str) -> None:
    """End QEMU's connection to the server an NBD node names (``nbd://host:port/...``)."""
    url = urllib.parse.urlsplit(filename)
    try:
        host, port = url.hostname, url.port
    except ValueError:
        return
    if not url.scheme.startswith("nbd") or host is None or port is None:
        return
    with contextlib.suppress(OSError, ValueError):
        fds = qemu_sockets.socket_fds_to_port(qemu_pid, port, host)
        qemu_sockets.shut_down(qemu_pid, list(fds))


async def _force_end(monitor: Monitor, jobs: list[str], nodes: list[str]) -> None:
    for job in jobs:
        with contextlib.suppress(QmpError):
            await monitor.execute("block-job-cancel", {"device": job, "force": True})
    try:
        await _concluded(monitor, jobs, ABORT_TIMEOUT, ABORT_POLL_S)
    except FerryError as err:
        log.error("the disk mirrors of '%s' did not end: %s", monitor.domain, err)
    await _remove(monitor, jobs, nodes)


async def _remove(monitor: Monitor, jobs: list[str], nodes: list[str]) -> None:
    """Dismiss ``jobs`` and delete ``nodes`` (emptying both lists)."""
    for job in list(jobs):
        with contextlib.suppress(QmpError):
            await monitor.execute("job-dismiss", {"id": job})
        jobs.remove(job)
    for node in list(nodes):
        try:
            await monitor.execute("blockdev-del", {"node-name": node})
        except QmpError as err:
            log.error("removing %s from '%s': %s", node, monitor.domain, err)
        nodes.remove(node)


async def _jobs_now(monitor: Monitor) -> dict[str, dict[str, Any]]:
    found = await monitor.execute("query-jobs")
    return {
        str(j.get("id")): j for j in (found if isinstance(found, list) else [])
        if isinstance(j, dict)
    }  # fmt: skip


async def _concluded(
    monitor: Monitor, jobs: list[str], timeout: float, poll_s: float
) -> dict[str, dict[str, Any]]:
    try:
        async with asyncio.timeout(timeout):
            while True:
                now = await _jobs_now(monitor)
                statuses = [now.get(j, {}).get("status") for j in jobs]
                if all(status in ("concluded", None) for status in statuses):
                    return now
                if await _stopped_on_error(monitor, {j: now[j] for j in jobs if j in now}):
                    raise MigrationError(
                        f"a disk mirror of '{monitor.domain}' stopped on an I/O error"
                    )
                await asyncio.sleep(poll_s)
    except TimeoutError:
        raise MigrationError(
            f"the disk mirrors of '{monitor.domain}' did not end within {timeout:.0f} s"
        ) from None


async def _stopped_on_error(monitor: Monitor, jobs: dict[str, dict[str, Any]]) -> set[str]:
    """Of ``jobs`` (query-jobs), those stopped on an error (``on-*-error: stop``):
    paused, or on standby if it had caught up."""
    if not any(info.get("status") in ("paused", "standby") for info in jobs.values()):
        return set()
    found = await monitor.execute("query-block-jobs")
    return {
        str(j.get("device")) for j in (found if isinstance(found, list) else [])
        if isinstance(j, dict) and j.get("device") in jobs and j.get("io-status", "ok") != "ok"
    }  # fmt: skip


def _storage(
    storage: dict[str, Any], indices: Sequence[int], target: str
) -> tuple[int, dict[int, str]]:
    """The target's answer checked: a port, and an export for every disk to copy."""
    port = storage.get("port")
    exports = storage.get("exports")
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
        raise MigrationError(f"{target} sent no usable port for its disk exports")
    if not isinstance(exports, dict):
        raise MigrationError(f"{target} exported no disks")
    found = {}
    for index in indices:
        name = exports.get(str(index))
        if not isinstance(name, str) or not name.isprintable() or not 0 < len(name) <= 64:
            raise MigrationError(f"{target} exported no disk vd{chr(97 + index)}")
        found[index] = name
    return port, found
