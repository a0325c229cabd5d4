"""The multifd stream's gate, on real QEMU: only a source holding this migration's one-time
key feeds the arriving QEMU, on every channel; anything else leaves it waiting."""

from __future__ import annotations

import asyncio
import socket
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from ferry.hypervisor.monitor import Monitor
from ferry.migration.params import MigrationParams
from ferry.migration.stream_gate import keep_port_to_source
from ferry.migration.stream_plan import plan_stream
from ferry.migration.stream_setup import setup_source, setup_target
from ferry.pki.qemu_psk import StreamKey
from ferry.pki.qemu_tls import QemuTls
from ferry.util.wait import wait_until

pytestmark = pytest.mark.integration
MID = "c0ffee" * 5 + "ab"


class _Tls(QemuTls):
    """Only the directory matters to the PSK path (no certificates are read)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory


async def _qemu(tmp: Path, tag: str, *extra: str) -> tuple[subprocess.Popen[bytes], Monitor]:
    sock = tmp / f"{tag}.sock"
    proc = subprocess.Popen(
        ["qemu-system-x86_64", "-accel", "tcg", "-machine", "pc", "-m", "64", "-nodefaults",
         "-display", "none", "-uuid", "6b1f0a52-34b4-4a0e-9e59-6d8c1b0d1e01",
         "-qmp", f"unix:{sock},server=on,wait=off", "-pidfile", str(tmp / f"{tag}.pid"),
         *extra],
        stderr=(tmp / f"{tag}.log").open("wb"),
    )  # fmt: skip
    monitor = Monitor(tag)

    async def connected() -> bool:
        try:
            await monitor.connect(sock, 1)
        except Exception:
            return False
        return True

    await wait_until(connected, timeout=10, interval=0.05, what=f"QMP of {tag}")
    return proc, monitor


@pytest.fixture
async def pair(tmp_path: Path) -> AsyncIterator[tuple[Monitor, Monitor, dict[str, Any]]]:
    procs = []
    try:
        src_proc, src = await _qemu(tmp_path, "src")
        procs.append(src_proc)
        dst_proc, dst = await _qemu(tmp_path, "dst", "-S", "-incoming", "defer")
        procs.append(dst_proc)
        settings = plan_stream(MigrationParams(), secure=True, cpus=2).params
        stream = await setup_target(
            dst, settings, _Tls(tmp_path / "tls"), None, StreamKey.new(MID),
            tmp_path / "stream-key", "127.0.0.1",
        )  # fmt: skip
        yield src, dst, stream
        for monitor in (src, dst):
            await monitor.close()
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


def dst_pid(tmp: Path) -> int:
    return int((tmp / "dst.pid").read_text())


async def _end(monitor: Monitor) -> dict[str, Any]:
    async def ended() -> dict[str, Any] | None:
        info = await monitor.execute("query-migrate")
        return info if info.get("status") in ("completed", "failed", "cancelled") else None

    result: dict[str, Any] = await wait_until(ended, timeout=60, what="the migration to end")
    return result


async def test_the_right_key_carries_every_channel(
    pair: tuple[Monitor, Monitor, dict[str, Any]], tmp_path: Path
) -> None:
    src, dst, stream = pair
    settings = plan_stream(MigrationParams(), secure=True, cpus=2).params
    # A stranger connects first and says nothing: alone, it would hold the
    # target's handshake and stall the source (QEMU 7.2); the gate ends it.
    stranger = socket.socket()
    stranger.bind(("127.0.0.2", 0))
    stranger.connect(("127.0.0.1", stream["port"]))
    gate = asyncio.create_task(
        keep_port_to_source("vm", dst_pid(tmp_path), stream["port"], "127.0.0.1",
                            settings.channels + 1)
    )  # fmt: skip
    uri = await setup_source(src, settings, _Tls(tmp_path / "tls"), "127.0.0.1", stream)
    await src.execute("migrate", {"uri": uri})
    assert (await _end(src))["status"] == "completed"
    assert (await _end(dst))["status"] == "completed"
    gate.cancel()  # as ferry does once the stream is in
    stranger.settimeout(5)
    assert stranger.recv(1) == b""  # ended by the gate
    stranger.close()


async def test_a_wrong_key_feeds_nothing_and_the_target_keeps_waiting(
    pair: tuple[Monitor, Monitor, dict[str, Any]], tmp_path: Path
) -> None:
    src, dst, stream = pair
    forged = stream | {"key": "0" * 64}
    settings = plan_stream(MigrationParams(), secure=True, cpus=2).params
    uri = await setup_source(src, settings, _Tls(tmp_path / "tls"), "127.0.0.1", forged)
    await src.execute("migrate", {"uri": uri})
    assert (await _end(src))["status"] == "failed"
    info = await dst.execute("query-migrate")
    assert info.get("status") in (None, "setup")  # nothing loaded, still listening
    status = await dst.execute("query-status")
    assert status["status"] == "inmigrate"
