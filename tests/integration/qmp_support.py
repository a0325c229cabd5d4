"""QEMU's monitor, for tests that start QEMU themselves (without ferry's launcher)."""

from __future__ import annotations

from pathlib import Path

from ferry.errors import QmpError
from ferry.hypervisor.monitor import Monitor
from ferry.util.wait import wait_until


async def monitor_at(path: Path, name: str) -> Monitor:
    """QEMU's monitor at ``path``, once it listens: its file exists a moment before."""

    async def connected() -> Monitor | None:
        monitor = Monitor(name)
        try:
            await monitor.connect(path, 10)
        except QmpError:
            return None
        return monitor

    return await wait_until(connected, timeout=10, interval=0.02, what=f"QMP at {path}")
