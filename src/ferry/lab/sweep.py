"""Ending what is left inside the lab's namespaces (QEMUs of a crashed ferryd, servers).

Being inside the lab's own namespace is the proof that the lab (or a command
run with ``lab exec``) started a process; nothing else is touched.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path

from ferry.hypervisor import process
from ferry.lab import netns, topology
from ferry.lab.storage import wait_gone


def _lab_netns_ids() -> set[tuple[int, int]]:
    ids = set()
    for name in [*netns.list_names(topology.NS_PREFIX), topology.LAN_NS]:
        with contextlib.suppress(OSError):
            info = os.stat(f"/run/netns/{name}")
            ids.add((info.st_dev, info.st_ino))
    return ids


def kill_namespace_processes(timeout: float = 10.0) -> list[str]:
    """End every process inside a lab namespace: SIGTERM, SIGKILL after ``timeout``.

    Returns what it ended, as ``comm (pid N)``.
    """
    ids = _lab_netns_ids()
    if not ids:
        return []
    victims: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            info = os.stat(entry / "ns" / "net")
            if (info.st_dev, info.st_ino) in ids and process.is_alive(int(entry.name)):
                victims[int(entry.name)] = (entry / "comm").read_text().strip()
    for pid in victims:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout  # one grace period for all of them
    for pid in victims:
        if not wait_gone(pid, deadline - time.monotonic()):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        process.reap(pid)
    return [f"{comm} (pid {pid})" for pid, comm in sorted(victims.items())]
