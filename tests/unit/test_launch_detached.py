"""A launch that ends midway (cancelled, or out of time) leaves no QEMU behind.

QEMU's ``-daemonize`` forks the QEMU that will run, and its first process
waits until that one is ready. Ended in between, the first process alone was
killed and the forked one ran on for nobody.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest

from ferry.errors import QemuLaunchError
from ferry.hypervisor import process
from ferry.util.wait import wait_until

# Forks its "daemon", which never gets ready, and waits for it as QEMU does.
SLOW_QEMU = """
import os, sys, time
if os.fork() == 0:
    time.sleep(60)
    sys.exit(0)
time.sleep(60)
"""


def launch_args(tmp_path: Path) -> tuple[list[str], Path]:
    script = tmp_path / "slow_qemu.py"
    script.write_text(SLOW_QEMU)
    pidfile = tmp_path / "qemu.pid"
    return [sys.executable, str(script), "-pidfile", str(pidfile)], pidfile


def ours(pidfile: Path) -> dict[int, list[bytes]]:
    return process.processes(b"\0-pidfile\0" + str(pidfile).encode() + b"\0")


async def test_a_cancelled_launch_ends_the_forked_qemu(tmp_path: Path) -> None:
    args, pidfile = launch_args(tmp_path)
    launch = asyncio.create_task(process.launch_detached(args, tmp_path / "log", pidfile, 30))
    await wait_until(lambda: len(ours(pidfile)) == 2, timeout=10, what="the fork")
    launch.cancel()
    with pytest.raises(asyncio.CancelledError):
        await launch
    assert ours(pidfile) == {}


async def test_a_launch_out_of_time_ends_the_forked_qemu(tmp_path: Path) -> None:
    args, pidfile = launch_args(tmp_path)
    with pytest.raises(QemuLaunchError, match="did not finish starting"):
        await process.launch_detached(args, tmp_path / "log", pidfile, 1.5)
    assert ours(pidfile) == {}
