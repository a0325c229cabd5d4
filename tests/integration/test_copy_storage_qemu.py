"""--copy-storage's two halves on real QEMUs (no guest, so each test takes seconds):
the target's NBD exports (``ferry.migration.disk_export``) and the source's mirrors
(``ferry.migration.disk_mirror``), over QEMU's TLS with the cluster CA's certificates.

What must hold: the copy is the source's disk byte for byte, writes made while it
runs included; only the source's certificate is admitted; a target that dies
midway leaves the source's QEMU running on its own disk, unchanged, with no node
or job of the copy left behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from ferry.domain.disks import DiskSpec
from ferry.errors import FerryError, MigrationError, QmpError
from ferry.hypervisor import qemu_sockets
from ferry.hypervisor.monitor import Monitor
from ferry.migration.disk_export import close_exports, export_disks
from ferry.migration.disk_mirror import DiskMirror, DiskProgress, _yank, clear_leftovers
from ferry.migration.stream_gate import start_gate
from ferry.migration.switchover import let_through
from ferry.pki.credentials import Credentials
from ferry.pki.qemu_tls import QemuTls
from ferry.storage.new_disk import create_image
from ferry.util.wait import wait_until
from tests.integration.qmp_support import monitor_at
from tests.unit.pki_support import TestCA

pytestmark = pytest.mark.integration
MIB = 1 << 20


def qemu(tmp: Path, tag: str, disk: Path, *extra: str) -> subprocess.Popen[bytes]:
    """A guestless QEMU with ferry's drive layout (SeaBIOS finds nothing to boot)."""
    return subprocess.Popen(
        [
            "qemu-system-x86_64", "-accel", "tcg", "-machine", "pc", "-m", "64",
            "-nodefaults", "-display", "none",
            "-drive", f"file={disk},if=none,id=disk0,node-name=ferry-disk0,format=qcow2,cache=none",
            "-device", "virtio-blk-pci,drive=disk0,id=vd0,addr=0x8",
            "-qmp", f"unix:{tmp / tag}.sock,server=on,wait=off", *extra,
        ],
        stderr=(tmp / f"{tag}.err").open("wb"),
    )  # fmt: skip


def qemu_io(disk: Path, *commands: str) -> None:
    args = [arg for c in commands for arg in ("-c", c)]
    subprocess.run(["qemu-io", "-f", "qcow2", *args, str(disk)], check=True, capture_output=True)


def identical(a: Path, b: Path) -> bool:
    cmd = ["qemu-img", "compare", "-q", "-U", "-f", "qcow2", "-F", "qcow2", str(a), str(b)]
    return subprocess.run(cmd).returncode == 0


@dataclass
class Pair:
    tmp: Path
    ca: TestCA
    src_disk: Path
    dst_disk: Path
    src: Monitor
    dst: Monitor
    src_proc: subprocess.Popen[bytes]
    dst_proc: subprocess.Popen[bytes]
    src_tls: QemuTls
    dst_tls: QemuTls
    source: Credentials

    async def export(self) -> dict[str, object]:
        spec = DiskSpec(path=str(self.dst_disk), target="xvda", format="qcow2")
        return await export_disks(self.dst, [spec], "127.0.0.1", self.dst_tls, self.source.identity)

    def mirror(
        self,
        storage: dict[str, object],
        tls: QemuTls | None = None,
        sync_writes: bool = False,
        speed: int = 0,
    ) -> DiskMirror:
        """``speed``: a cap from the job's start, so that it is still copying
        when the test acts (set afterwards, the bulk may be done already)."""
        return DiskMirror(
            self.src, tls or self.src_tls, "h2", "127.0.0.1", storage, [0], self.src_proc.pid,
            sync_writes, speed,
        )  # fmt: skip


@pytest.fixture
async def pair(tmp_path: Path) -> AsyncIterator[Pair]:
    ca = TestCA(tmp_path)
    h1, h2 = ca.credentials("h1"), ca.credentials("h2")
    src_disk, dst_disk = tmp_path / "src.qcow2", tmp_path / "dst.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(src_disk), "512M"], check=True)
    # Data at both ends and a hole between: the copy must keep all three right.
    qemu_io(src_disk, "write -P 0xab 0 96M", "write -P 0x11 400M 16M")
    await create_image(str(dst_disk), "qcow2", 512 * MIB)
    procs = [qemu(tmp_path, "src", src_disk)]
    procs.append(qemu(tmp_path, "dst", dst_disk, "-S", "-incoming", "defer"))
    try:
        src = await monitor_at(tmp_path / "src.sock", "src")
        dst = await monitor_at(tmp_path / "dst.sock", "dst")
        yield Pair(
            tmp_path, ca, src_disk, dst_disk, src, dst, procs[0], procs[1],
            QemuTls(h1, tmp_path / "tls-h1"), QemuTls(h2, tmp_path / "tls-h2"), h1,
        )  # fmt: skip
        for monitor in (src, dst):
            await monitor.close()
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


async def status(monitor: Monitor) -> str:
    info = await monitor.execute("query-migrate")
    assert isinstance(info, dict)
    return str(info.get("status", "none"))


async def test_disk_and_memory_switch_over_together(pair: Pair) -> None:
    """The whole source sequence of a --copy-storage migration, on two QEMUs."""
    storage = await pair.export()
    caps = [{"capability": "late-block-activate", "state": True}]
    await pair.dst.execute("migrate-set-capabilities", {"capabilities": caps})
    await pair.dst.execute("migrate-incoming", {"uri": "tcp:127.0.0.1:0"})
    info = await pair.dst.execute("query-migrate")
    port = info["socket-address"][0]["port"]  # type: ignore[index]

    mirror = pair.mirror(storage)
    await mirror.start()
    seen: list[DiskProgress] = []

    async def tick(disk: DiskProgress) -> None:
        seen.append(disk)

    ready = await mirror.until_ready(tick, stall_s=10, poll_s=0.02)
    assert ready.ready and ready.copied == ready.total >= 512 * MIB
    # Written after the bulk was copied: the mirror must carry it over as well.
    await pair.src.execute(
        "human-monitor-command", {"command-line": 'qemu-io disk0 "write -P 0x5a 200M 4M"'}
    )
    caps = [{"capability": "pause-before-switchover", "state": True}]
    await pair.src.execute("migrate-set-capabilities", {"capabilities": caps})
    await pair.src.execute("migrate", {"uri": f"tcp:127.0.0.1:{port}"})
    await wait_until(
        lambda: _is(pair.src, "pre-switchover"), timeout=30, interval=0.02, what="the hold"
    )
    done = await mirror.finish()
    assert done.copied == done.total and not mirror.active
    nodes = await pair.src.execute("query-named-block-nodes")
    assert not [n for n in nodes if str(n.get("node-name", "")).startswith("ferry-mig-")]  # type: ignore[union-attr]
    await let_through(pair.src)
    await wait_until(lambda: _is(pair.dst, "completed"), timeout=30, what="the stream")
    await close_exports(pair.dst, pair.dst_proc.pid, storage["port"])
    await pair.dst.execute("cont")
    # The target's disk, now the guest's, is the source's byte for byte.
    assert identical(pair.src_disk, pair.dst_disk)
    assert seen and not seen[0].ready


async def _is(monitor: Monitor, wanted: str) -> bool:
    return await status(monitor) == wanted


async def test_only_the_source_is_admitted(pair: Pair) -> None:
    """A host of the same CA that is not the source gets nothing of the export."""
    storage = await pair.export()
    other = QemuTls(pair.ca.credentials("h3"), pair.tmp / "tls-h3")
    mirror = pair.mirror(storage, tls=other)
    with pytest.raises(FerryError):
        await mirror.start()
    await mirror.abort()
    empty = pair.tmp / "empty.qcow2"
    await create_image(str(empty), "qcow2", 512 * MIB)
    assert identical(pair.dst_disk, empty), "the target's disk was written"


async def test_a_target_killed_midway_leaves_the_source_whole(pair: Pair) -> None:
    reference = pair.tmp / "reference.qcow2"
    shutil.copyfile(pair.src_disk, reference)
    storage = await pair.export()
    mirror = pair.mirror(storage)
    await mirror.start()
    killed = False

    async def tick(disk: DiskProgress) -> None:
        nonlocal killed
        if disk.copied > 0 and not killed:
            os.kill(pair.dst_proc.pid, signal.SIGKILL)
            killed = True

    with pytest.raises(MigrationError, match="copy of disk vda"):
        await mirror.until_ready(tick, stall_s=10, poll_s=0.001)
    began = time.monotonic()
    await mirror.abort()
    assert time.monotonic() - began < 10
    state = await pair.src.execute("query-status")
    assert state["running"], state  # type: ignore[index]
    assert await pair.src.execute("query-jobs") == []
    nodes = await pair.src.execute("query-named-block-nodes")
    assert not [n for n in nodes if str(n.get("node-name", "")).startswith("ferry-mig-")]  # type: ignore[union-attr]
    await pair.src.execute("quit")
    pair.src_proc.wait(10)
    assert identical(pair.src_disk, reference)


async def test_a_write_blocking_mirror_stops_when_its_target_dies(pair: Pair) -> None:
    """It pauses on the error rather than end by itself (QEMU 7.2 frees its
    in-flight bitmap as it ends, guest writes or not); ferry reads that as a
    failed copy, and its abort ends it with the VM stopped for that moment."""
    storage = await pair.export()
    mirror = pair.mirror(storage, sync_writes=True, speed=4 * MIB)
    await mirror.start()

    async def copying() -> bool:
        return (await mirror.progress()).copied > 0

    await wait_until(copying, timeout=10, what="the copy to begin")
    os.kill(pair.dst_proc.pid, signal.SIGKILL)
    why = await wait_until(failed_copy(mirror), timeout=20, what="the copy to fail")
    assert "stopped on an I/O error" in why, why
    await stopped_then_aborted(pair, mirror, "paused")


async def test_a_caught_up_write_blocking_mirror_stops_when_a_write_fails(pair: Pair) -> None:
    """Caught up, it waits on standby (not paused) after the error: still a failed copy."""
    storage = await pair.export()
    mirror = pair.mirror(storage, sync_writes=True)
    await mirror.start()
    await mirror.until_ready(_ignore, stall_s=30, poll_s=0.01)
    os.kill(pair.dst_proc.pid, signal.SIGKILL)
    pair.dst_proc.wait(10)
    # A write as the guest's would be: through the device, copied to the target.
    await pair.src.execute(
        "human-monitor-command", {"command-line": 'qemu-io disk0 "write -P 0x33 0 64k"'}
    )
    why = await wait_until(failed_copy(mirror), timeout=10, what="the copy to fail")
    assert "stopped on an I/O error" in why, why
    await stopped_then_aborted(pair, mirror, "standby")


def failed_copy(mirror: DiskMirror) -> Callable[[], Awaitable[str | None]]:
    """Why the mirror's copy failed, once progress() says it has."""

    async def failed() -> str | None:
        try:
            await mirror.progress()
        except MigrationError as err:
            return str(err)
        return None

    return failed


async def stopped_then_aborted(pair: Pair, mirror: DiskMirror, status: str) -> None:
    """The mirror's job waits in ``status``; the abort ends it and the VM runs."""
    jobs = await pair.src.execute("query-jobs")
    assert jobs[0]["status"] == status, jobs  # type: ignore[index]
    await mirror.abort()
    assert await pair.src.execute("query-jobs") == []
    state = await pair.src.execute("query-status")
    assert state["running"], state  # type: ignore[index]


async def test_a_mirror_not_caught_up_is_not_finished(pair: Pair) -> None:
    """finish() before READY would leave the target short of blocks: refused."""
    storage = await pair.export()
    mirror = pair.mirror(storage, speed=1 * MIB)
    await mirror.start()
    with pytest.raises(MigrationError, match="not caught up"):
        await mirror.finish()
    await mirror.abort()
    assert await pair.src.execute("query-jobs") == []


async def test_mirrors_left_by_a_dead_ferryd_are_ended(pair: Pair) -> None:
    """A ferryd that died midway left its mirror running: the next one ends it
    (taking the domain back, or before a new copy), and a new copy can start."""
    storage = await pair.export()
    left = pair.mirror(storage, speed=1 * MIB)
    await left.start()
    await clear_leftovers(pair.src)
    assert await pair.src.execute("query-jobs") == []
    nodes = await pair.src.execute("query-named-block-nodes")
    assert not [n for n in nodes if str(n.get("node-name", "")).startswith("ferry-mig-")]  # type: ignore[union-attr]
    state = await pair.src.execute("query-status")
    assert state["running"], state  # type: ignore[index]
    # (The target's server takes one connection per disk: a new export for the new copy.)
    await pair.dst.execute("nbd-server-stop")
    again = pair.mirror(await pair.export())
    await again.start()
    await again.abort()


async def test_a_yanked_node_fails_its_mirror(pair: Pair) -> None:
    """QEMU 7.2's yank on an NBD node: its connection ends and the mirror fails
    on its next write, with no connection left. A node QEMU does not know is
    refused (the abort then shuts the sockets from outside)."""
    storage = await pair.export()
    port = int(storage["port"])  # type: ignore[call-overload]
    mirror = pair.mirror(storage, speed=1 * MIB)
    await mirror.start()
    assert qemu_sockets.socket_fds_to_port(pair.src_proc.pid, port, "127.0.0.1")
    assert await _yank(pair.src, ["ferry-mig-0"])
    # Its next write fails; one in flight when yanked may have failed it already.
    with contextlib.suppress(QmpError):
        await pair.src.execute("block-job-set-speed", {"device": "ferry-mirror-0", "speed": 0})

    async def failed() -> bool:
        jobs = await pair.src.execute("query-jobs")
        return bool(jobs) and jobs[0].get("status") == "concluded"  # type: ignore[index]

    await wait_until(failed, timeout=10, interval=0.05, what="the yanked mirror to fail")
    jobs = await pair.src.execute("query-jobs")
    assert jobs[0].get("error"), jobs  # type: ignore[index]
    # (The job may conclude before QEMU has closed the yanked connection.)
    await wait_until(
        lambda: not qemu_sockets.socket_fds_to_port(pair.src_proc.pid, port, "127.0.0.1"),
        timeout=5, interval=0.01, what="the yanked connection closed, none reopened",
    )  # fmt: skip
    assert not await _yank(pair.src, ["ferry-no-such-node"])
    await mirror.abort()
    assert await pair.src.execute("query-jobs") == []


async def test_a_stranger_on_the_export_port_neither_blocks_the_copy_nor_the_stop(
    pair: Pair,
) -> None:
    """One connection per disk: a stranger holding the slot would keep the source out,
    and one still negotiating when the server stops is CVE-2024-7409 in 7.2."""
    storage = await pair.export()
    port = int(storage["port"])  # type: ignore[call-overload]
    # (QEMU itself would drop it only after its 10 s handshake limit.)
    stranger = await asyncio.to_thread(_connect_from, "127.0.0.2", port, 5)
    gate = start_gate("vm", pair.dst_proc.pid, port, "127.0.0.1", 1, None)
    try:
        await asyncio.to_thread(_until_closed, stranger)
        mirror = pair.mirror(storage)
        await mirror.start()
        await mirror.until_ready(_ignore, stall_s=30, poll_s=0.01)
        await mirror.finish()
    finally:
        gate.cancel()
    # The gate is gone: one more stranger, from the source's own address even.
    late = await asyncio.to_thread(_connect_from, "127.0.0.1", port, 5)
    await close_exports(pair.dst, pair.dst_proc.pid, port)
    await asyncio.to_thread(_until_closed, late)
    assert await pair.dst.execute("query-block-exports") == []
    assert identical(pair.src_disk, pair.dst_disk)


async def test_strangers_connecting_all_through_the_close_do_not_hang_it(pair: Pair) -> None:
    """7.2's ``nbd-server-stop`` hangs for good on a client still negotiating: one
    accepted between ending the connections and the stop hung a CI run. Strangers
    connect without pause while the exports close: none may get in after."""
    storage = await pair.export()
    port = int(storage["port"])  # type: ignore[call-overload]
    done = threading.Event()
    held: list[socket.socket] = []
    flood = threading.Thread(target=_connect_until, args=(port, done, held))
    flood.start()
    try:
        await wait_until(
            lambda: bool(qemu_sockets.socket_fds_on_port(pair.dst_proc.pid, port))
            and len(held) > 1,
            timeout=10, interval=0.005, what="a stranger accepted, another waiting",
        )  # fmt: skip
        await close_exports(pair.dst, pair.dst_proc.pid, port)
    finally:
        done.set()
        await asyncio.to_thread(flood.join)
        for sock in held:
            sock.close()
    assert len(held) > 1, held
    assert await pair.dst.execute("query-block-exports") == []
    with pytest.raises(ConnectionRefusedError):
        _connect_from("127.0.0.2", port, 5).close()


def _connect_until(port: int, done: threading.Event, held: list[socket.socket]) -> None:
    """Connect to ``port`` again and again, each connection held open, until ``done``."""
    while not done.is_set():
        with contextlib.suppress(OSError):
            held.append(_connect_from("127.0.0.2", port, 1))


async def _ignore(_disk: DiskProgress) -> None:
    return None


def _connect_from(address: str, port: int, timeout: float) -> socket.socket:
    sock = socket.socket()
    try:
        sock.bind((address, 0))
        sock.settimeout(timeout)
        sock.connect(("127.0.0.1", port))
    except OSError:
        sock.close()
        raise
    return sock


def _until_closed(sock: socket.socket) -> None:
    """Read (the server's greeting, if any) until the server ends the connection."""
    with sock:
        try:
            while sock.recv(4096):
                pass
        except ConnectionResetError:
            pass
