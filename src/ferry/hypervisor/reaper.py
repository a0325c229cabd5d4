"""Reaping the processes ferryd adopts as a child subreaper.

QEMU's ``-daemonize`` forks twice; the middle process exits at once and, as
ferryd is a subreaper, becomes ferryd's child. Nobody waits for it: without
this reaper every launch left one zombie behind (18 after one lab run).

asyncio waits for the children it started itself (a probe QEMU, qemu-img)
and must get their exit status, so the reaper never takes a zombie at first
sight: only one that stayed a zombie for ``GRACE_S`` across two sweeps, which
no child that asyncio is waiting for does.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from pathlib import Path

from ferry.util.tasks import spawn

log = logging.getLogger("ferryd")

GRACE_S = 2.0
SWEEP_EVERY_S = 10.0


def zombie_children(parent: int | None = None) -> list[int]:
    """The PIDs of ``parent``'s children (default: ours) that have ended unreaped."""
    parent = os.getpid() if parent is None else parent
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        # After the name: state, then ppid.
        if fields[0] == "Z" and int(fields[1]) == parent:
            found.append(int(entry.name))
    return found


class ChildReaper:
    def __init__(self, grace_s: float = GRACE_S, every_s: float = SWEEP_EVERY_S) -> None:
        self.grace_s = grace_s
        self.every_s = every_s
        self.reaped = 0
        self._first_seen: dict[int, float] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGCHLD, self._wake.set)
        self._task = spawn(self._run(), "child reaper")

    async def close(self) -> None:
        with contextlib.suppress(RuntimeError):
            asyncio.get_running_loop().remove_signal_handler(signal.SIGCHLD)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        while True:
            # asyncio.timeout, not wait_for: in 3.11 wait_for loses a
            # cancellation that comes as the event is set (seen here: close()
            # hung for ever when a SIGCHLD and the cancel met).
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.every_s):
                    await self._wake.wait()
            self._wake.clear()
            # A new zombie needs a second look after the grace period.
            while self.sweep():
                await asyncio.sleep(self.grace_s)

    def sweep(self) -> bool:
        """Reap the zombies seen long enough; True while some are still in grace."""
        now = time.monotonic()
        zombies = set(zombie_children())
        self._first_seen = {p: t for p, t in self._first_seen.items() if p in zombies}
        waiting = False
        for pid in zombies:
            first = self._first_seen.setdefault(pid, now)
            if now - first < self.grace_s:
                waiting = True
                continue
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)
                self.reaped += 1
                log.debug("reaped adopted process %d", pid)
            self._first_seen.pop(pid, None)
        return waiting
