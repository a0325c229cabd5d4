"""What an arriving domain waits on: the cluster store's decision, and its device state."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from qemu.qmp import EventListener

from ferry.cluster.ownership import Ownership
from ferry.errors import ClusterError, ClusterUnavailable, FerryError, MigrationError
from ferry.host.record import DomainRecord
from ferry.host.running import RunningDomain
from ferry.migration.switchover import stream_status
from ferry.util.wait import wait_until

log = logging.getLogger("ferryd")


async def decide_in_store(ownership: Ownership, record: DomainRecord, commit: bool) -> bool:
    """The cluster store's answer, however long it takes: a lost answer is no answer.

    Until it comes, the arriving QEMU stays, paused: ending it could lose a
    domain that the store has already made this host's. True: it is ours.
    """
    mid = str(record.migration_id)
    name = record.config.name
    delay = 0.2
    while True:
        try:
            return await ownership.decide_move(record.move_ticket(), mid, commit)
        except ClusterUnavailable as err:
            log.warning("migration %s of %s waits for etcd: %s", mid[:8], name, err)
        except ClusterError as err:
            # Refused before anything was sent (no valid lease): nothing applied.
            log.error("migration %s of %s: %s", mid[:8], name, err)
            return False
        await asyncio.sleep(delay)
        delay = min(delay * 2, 2.0)


async def wait_device_state(dom: RunningDomain) -> None:
    """Until the arriving QEMU has loaded the device state (its runstate leaves inmigrate).

    Quick at first: the source lets its stream through as soon as it hears
    the commit. Then for as long as it takes: a source whose ferryd lost the
    answer lets it through once it learns the outcome, even after a restart.
    Raises FerryError when the QEMU's stream fails or the QEMU ends.
    """
    began = time.monotonic()
    warned = began
    while True:
        if time.monotonic() - warned > 60:
            warned = time.monotonic()
            log.warning("committed domain %s still waits for its device state from %s (%.0f s)",
                        dom.name, dom.record.migration_source, warned - began)  # fmt: skip
        status = await dom.monitor.execute("query-status")
        if isinstance(status, dict) and status.get("status") not in ("inmigrate", None):
            return
        stream = await stream_status(dom.monitor)
        if stream in ("failed", "cancelled"):
            raise MigrationError(f"its incoming stream {stream} before the device state came")
        await asyncio.sleep(0.005 if time.monotonic() - began < 10 else 0.5)


async def check_stream_alive(dom: RunningDomain) -> None:
    status = await stream_status(dom.monitor)
    if status != "active":
        raise MigrationError(f"the incoming stream of '{dom.name}' is {status} here")


async def wait_stream_complete(dom: RunningDomain, timeout: float) -> None:
    async def completed() -> bool:
        status = await stream_status(dom.monitor)
        if status in ("failed", "cancelled"):
            raise MigrationError(f"the incoming stream of '{dom.name}' {status} here")
        return status == "completed"

    try:
        await wait_until(
            completed,
            timeout=timeout,
            interval=0.005,
            what=f"the incoming stream of '{dom.name}' to complete",
        )
    except FerryError as err:
        raise MigrationError(str(err)) from err


def event_time(events: EventListener | None, status: str) -> float | None:
    """When QEMU reported migration ``status`` (its own clock, from the event)."""
    history: list[Any] = list(events.history) if events is not None else []
    for event in history:
        if event["data"].get("status") == status:
            stamp = event["timestamp"]
            return float(stamp["seconds"] + stamp["microseconds"] / 1e6)
    return None
