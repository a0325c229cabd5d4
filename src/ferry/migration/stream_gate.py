"""The arriving QEMU's multifd port, kept to the source until every channel is in.

QEMU 7.2 runs the TLS handshake of an accepted connection without waiting for
it in the background: a connection that opens and then sends nothing (or half
a TLS record) holds the target's main loop, the source's channels never
complete their handshakes, and the source QEMU blocks in its migration set-up
with its global lock held (seen here: its QMP answered nothing for 30 s).
The one-time key stops a stranger from feeding the VM, not from stalling it.
So until the source's channels are all connected (QEMU then closes its
listener), ferry ends any connection to that port from another address, as
soon as it appears (polled every few milliseconds).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from ferry.hypervisor.qemu_sockets import (
    foreign_fds_on_port,
    is_listening,
    shut_down,
    socket_fds_on_port,
)

log = logging.getLogger("ferryd")

POLL_S = 0.005
SETTLED_POLL_S = 0.05
WINDOW_S = 120.0  # the source connects within its prepare timeout, or never


async def keep_port_to_source(
    name: str, pid: int, port: int, source: str, channels: int, window_s: float | None = WINDOW_S
) -> None:
    """Until QEMU closes its listener: end every connection not from ``source``.

    QEMU counts a channel, and closes the listener after the last, only once
    its TLS handshake is done: the port is guarded until then, every 5 ms
    while fewer than ``channels`` connections are in, every 50 ms after.
    ``window_s`` None: for as long as the listener lasts (the disk exports',
    open until their server stops), or the task is cancelled.
    """
    loop = asyncio.get_running_loop()
    end = None if window_s is None else loop.time() + window_s
    ended: set[int] = set()  # socket inodes, until QEMU closes its descriptors
    while end is None or loop.time() < end:
        foreign = foreign_fds_on_port(pid, port, source)
        new = {fd: i for fd, i in foreign.items() if i not in ended}
        if new:
            log.warning(
                "domain %s: ended %d connection(s) to its migration port %d not from the "
                "source %s", name, len(new), port, source,
            )  # fmt: skip
            with contextlib.suppress(OSError):
                shut_down(pid, list(new))
            ended |= set(new.values())
        elif not is_listening(pid, port):
            return
        connected = len(socket_fds_on_port(pid, port)) - len(foreign)
        await asyncio.sleep(POLL_S if connected < channels else SETTLED_POLL_S)


def start_gate(
    name: str, pid: int, port: int, source: str, channels: int, window_s: float | None = WINDOW_S
) -> asyncio.Task[None]:
    """``keep_port_to_source`` in the background; a failure is logged, never silent."""
    task = asyncio.create_task(
        keep_port_to_source(name, pid, port, source, channels, window_s),
        name=f"gate of {name}'s port {port}",
    )
    task.add_done_callback(_gate_ended)
    return task


def _gate_ended(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("a port gate failed; the arriving port is unguarded: %r", task.exception())
