"""QEMU as an operating-system process: launch detached, find again, end.

QEMU is started with ``-daemonize``: its first process exits once the machine
is set up (with QEMU's own error on failure), and the real QEMU lives on in a
session of its own, so it survives a restart or crash of ferryd. ferryd marks
itself a child subreaper, so the QEMUs it starts stay its children and are
reaped at once when they end.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import signal
import time
from collections.abc import Sequence
from pathlib import Path

from ferry.errors import QemuLaunchError

PR_SET_CHILD_SUBREAPER = 36
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def become_subreaper() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")


def _last_error_line(log: Path, start: int) -> str:
    try:
        with log.open("rb") as f:
            f.seek(start)
            lines = f.read().decode(errors="replace").strip().splitlines()
    except OSError:
        return "no log"
    for line in reversed(lines):
        if line.strip():
            # "2024-01-01T00:00:00.000000Z qemu-system-x86_64: -drive ...: Could not open"
            text = line.split(" ", 1)[1] if line[:4].isdigit() and " " in line else line
            return text.strip()
    return "no message"


async def launch_detached(args: Sequence[str], log: Path, pidfile: Path, timeout: float) -> int:
    """Run QEMU with -daemonize; return the PID of the detached QEMU."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        pidfile.unlink()
    with log.open("ab") as out:
        start = out.tell()
        proc = await asyncio.create_subprocess_exec(
            *args, stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=out
        )
        try:
            code = await asyncio.wait_for(proc.wait(), timeout)
        except BaseException as err:
            # Timed out or cancelled: QEMU may have forked its daemon already,
            # and a QEMU started for nobody must not outlive its launch.
            await asyncio.shield(_end_launch(proc, pidfile))
            if isinstance(err, TimeoutError):
                raise QemuLaunchError(
                    f"QEMU did not finish starting within {timeout:.0f} s (log: {log})"
                ) from None
            raise
    if code != 0:
        raise QemuLaunchError(_last_error_line(log, start))
    pid = read_pidfile(pidfile)
    if pid is None:
        raise QemuLaunchError(f"QEMU started but wrote no pidfile {pidfile}")
    return pid


async def _end_launch(proc: asyncio.subprocess.Process, pidfile: Path) -> None:
    """End a launch midway: QEMU's first process, and the daemon it may have forked
    (found by the pidfile in its command line, which the fork shares from birth)."""
    with contextlib.suppress(ProcessLookupError):
        proc.kill()
    await proc.wait()
    # Again, for a daemon forked just as its parent was being ended.
    for _ in range(3):
        found = processes(b"\0-pidfile\0" + str(pidfile).encode() + b"\0")
        if not found:
            return
        for pid in found:
            await terminate(pid, 0)


def read_pidfile(pidfile: Path) -> int | None:
    try:
        return int(pidfile.read_text().strip())
    except (OSError, ValueError):
        return None


def process_state(pid: int) -> str | None:
    """The kernel's one-letter state of ``pid`` (None if it is gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[0]


def is_alive(pid: int) -> bool:
    state = process_state(pid)
    return state is not None and state not in ("Z", "X")


def is_our_qemu(pid: int, marker: Path) -> bool:
    """True if ``pid`` is alive and is the QEMU that owns ``marker`` (a socket path).

    Guards against a recycled PID after a reboot or a long downtime of ferryd.
    """
    if not is_alive(pid):
        return False
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return str(marker).encode() in cmdline


def rss_mib(pid: int) -> int:
    """Resident memory of ``pid`` in MiB (0 if it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) // 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def processes(*markers: bytes) -> dict[int, list[bytes]]:
    """Live processes whose command line holds every marker: PID -> argv."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if all(m in cmdline for m in markers) and is_alive(int(entry.name)):
            found[int(entry.name)] = cmdline.rstrip(b"\0").split(b"\0")
    return found


def cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    # utime and stime are fields 14 and 15 of stat, 12 and 13 after the name.
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


def reap(pid: int) -> None:
    """Collect ``pid``'s exit status if it is our child; harmless otherwise."""
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


async def wait_exit(pid: int, timeout: float) -> bool:
    """Wait until ``pid`` has ended (and reap it if ours); False on timeout."""
    loop = asyncio.get_running_loop()
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        reap(pid)
        return True
    done = loop.create_future()

    def on_exit() -> None:
        if not done.done():
            done.set_result(None)

    loop.add_reader(pidfd, on_exit)
    try:
        deadline = time.monotonic() + timeout
        while True:
            reap(pid)
            if not is_alive(pid):
                return True
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            # asyncio.timeout: in 3.11 wait_for can lose a cancellation.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(remaining):
                    await asyncio.shield(done)
            if done.done():
                reap(pid)
                # A process not our child stays a zombie until its parent
                # reaps it; it has ended all the same.
                return True
    finally:
        loop.remove_reader(pidfd)
        os.close(pidfd)


async def terminate(pid: int, grace: float) -> None:
    """SIGTERM, then SIGKILL after ``grace`` seconds."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            reap(pid)
            return
        if await wait_exit(pid, wait):
            return
