"""The source QEMU around its switchover: held before it, let through it, followed past it.

With post-copy (an opt-in, see MigrationParams.postcopy) the source's QEMU
stops the VM and waits before the switch (``pause-before-switchover``): the
target commits there, while the VM can still come back here. Verified on
QEMU 7.2 in this lab: a stream held in ``pre-switchover`` can be cancelled,
and ``cont`` then runs the VM here again; once post-copy has begun it cannot,
``migrate_cancel`` then hangs in ``cancelling`` for good. So ``migrate-continue``
is sent only after the target's commit, and a cancel only before it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

from ferry.errors import FerryError, PostcopyFailed
from ferry.hypervisor.monitor import Monitor
from ferry.migration.channel import Channel
from ferry.migration.progress import Progress
from ferry.util.wait import wait_until

log = logging.getLogger("ferryd")

HELD = "pre-switchover"
# Let through (only ever after the target's commit): the device state is on its
# way, or the target runs the VM and only this QEMU has its missing pages.
# ("device" comes only after pre-switchover: a held pre-copy let through.)
PAST_SWITCH = frozenset({"device", "postcopy-active", "postcopy-paused", "postcopy-recover"})
ENDED = frozenset({"none", "completed", "failed", "cancelled"})
POLL_S = 0.25
RESUMED_TIMEOUT = 30.0
SETTLE_TIMEOUT = 30.0


async def stream_status(monitor: Monitor) -> str:
    info = await monitor.execute("query-migrate")
    return str(info.get("status", "none")) if isinstance(info, dict) else "none"


async def holds_for_commit(monitor: Monitor) -> bool:
    """This QEMU stops before its switch for the commit (a post-copy migration's)."""
    caps = await monitor.execute("query-migrate-capabilities")
    return any(
        c.get("capability") == "pause-before-switchover" and c.get("state")
        for c in (caps if isinstance(caps, list) else [])
    )


async def let_through(monitor: Monitor) -> None:
    """The target has committed: a stream held before its switch goes on."""
    if await stream_status(monitor) == HELD:
        await monitor.execute("migrate-continue", {"state": HELD})


async def follow_to_end(
    monitor: Monitor, on_sample: Callable[[Progress], None] | None = None
) -> Progress:
    """Until this QEMU's stream has completed; PostcopyFailed if it cannot any more.

    ``postcopy-paused`` is QEMU's way of saying the link broke past the switch
    (it waits for a recovery ferry does not drive): that is the end here too.
    """
    with monitor.listener(("MIGRATION",)) as events:
        while True:
            progress = Progress.from_qmp(await monitor.execute("query-migrate"))
            if on_sample is not None:
                on_sample(progress)
            if progress.status == "completed":
                return progress
            if progress.status in ("failed", "cancelled", "postcopy-paused"):
                raise PostcopyFailed(
                    f"the memory stream of '{monitor.domain}' broke after the switch to "
                    f"post-copy ({progress.status}, {progress.remaining / 1e6:.0f} MB not yet "
                    "on the target): the domain is lost"
                )
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(POLL_S):
                    await events.get()


async def finish_postcopy(
    monitor: Monitor, channel: Channel, on_sample: Callable[[Progress], None]
) -> tuple[Progress, float | None, float]:
    """Let the held stream through and follow it to its end.

    Returns the last sample, the target's RESUME time (None if it did not
    say) and how long the post-copy phase took.
    """
    began = time.monotonic()
    resumed = asyncio.create_task(channel.recv(RESUMED_TIMEOUT, "resumed"))
    try:
        await let_through(monitor)
        progress = await follow_to_end(monitor, on_sample)
        resume_ts = None
        with contextlib.suppress(FerryError, TimeoutError):
            reply: Any = await asyncio.wait_for(asyncio.shield(resumed), 5.0)
            stamp = reply.get("resume_ts")
            resume_ts = float(stamp) if isinstance(stamp, int | float) else None
    finally:
        resumed.cancel()
        with contextlib.suppress(asyncio.CancelledError, FerryError):
            await resumed
    return progress, resume_ts, time.monotonic() - began


async def settle_for_handover(monitor: Monitor) -> None:
    """Before the source's copy ends: its stream through the switch and complete.

    After a commit whose answer was lost, the stream may still be held: the
    target cannot run the VM until it is let through. Past the switch, ending
    this QEMU early would take the pages the target still lacks with it.
    """
    try:
        await let_through(monitor)
        if await stream_status(monitor) not in ENDED:
            await follow_to_end(monitor)
    except PostcopyFailed as err:
        log.error("%s", err)
    except FerryError as err:
        log.error("handing over '%s': its stream did not settle: %s", monitor.domain, err)


async def release_held(monitor: Monitor) -> bool:
    """Before the source takes its VM back: cancel a stream held before its switch.

    False if the stream is past it: the VM must then never run here again.
    Any other stream was cancelled by the rollback already; a pre-copy's VM
    runs on while QEMU cancels (on a cut link that lasts until TCP gives up).
    """
    status = await stream_status(monitor)
    if status in PAST_SWITCH:
        return False
    if status == HELD:
        await monitor.execute("migrate_cancel")
        await wait_migration_settled(monitor)
    return True


async def wait_migration_settled(monitor: Monitor, timeout: float | None = None) -> None:
    """Until QEMU's outgoing migration has ended one way or the other."""
    timeout = SETTLE_TIMEOUT if timeout is None else timeout

    async def settled() -> bool:
        return await stream_status(monitor) in ENDED

    await wait_until(
        settled, timeout=timeout, what=f"QEMU of '{monitor.domain}' to settle its migration"
    )
