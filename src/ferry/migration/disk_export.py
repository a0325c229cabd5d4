"""The target's side of ``--copy-storage``: its new disks exported to the source over NBD.

The arriving QEMU serves its own empty disks (QEMU's NBD server, writable
exports of the disks' format nodes) for the source's mirrors to write into,
before the memory stream starts: an export activates its node even under
``-incoming defer``, by design for this use. The server runs only with TLS
(QEMU's, x509 of the cluster CA) and admits only the source's certificate
(``tls-authz``): a writable export is a writable disk. QEMU 7.2's NBD server
takes TLS on a TCP address only (not on a handed-over descriptor), so ferry
chooses the port. It closes the server before the commit point; on an abort
the whole QEMU ends instead (``nbd-server-stop`` with a client still
negotiating hangs 7.2: see ``close_exports``).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Sequence
from typing import Any

from ferry.domain.disks import DiskSpec
from ferry.errors import MigrationError, QmpError
from ferry.hypervisor.cmdline import disk_node
from ferry.hypervisor.monitor import Monitor
from ferry.hypervisor.qemu_sockets import shut_down, socket_fds_on_port, stop_listening
from ferry.pki.identity import Identity
from ferry.pki.qemu_tls import QemuTls

EXPORT_PREFIX = "ferry-nbd-"
PORT_ATTEMPTS = 8
STOP_TIMEOUT = 10.0
CLOSE_POLL_S = 0.002


def free_port(address: str) -> int:
    """A port nobody listens on at ``address`` now (QEMU binds it right after)."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.bind((address, 0))
        return int(probe.getsockname()[1])


async def export_disks(
    monitor: Monitor,
    disks: Sequence[DiskSpec],
    bind: str,
    tls: QemuTls,
    source: Identity,
) -> dict[str, Any]:
    """Serve ``disks`` to ``source`` only; how the source reaches them (for prepared)."""
    creds, authz = await tls.setup_nbd_server(monitor, source)
    port = 0
    for attempt in range(PORT_ATTEMPTS):
        port = free_port(bind)
        try:
            await monitor.execute(
                "nbd-server-start",
                {
                    "addr": {"type": "inet", "data": {"host": bind, "port": str(port)}},
                    "tls-creds": creds,
                    "tls-authz": authz,
                    # One connection per disk (the source's mirrors), and no more.
                    "max-connections": len(disks),
                },
            )
            break
        except QmpError as err:
            # Someone took the port between the probe and QEMU's bind: another.
            if "in use" not in str(err) or attempt == PORT_ATTEMPTS - 1:
                raise MigrationError(f"the arriving QEMU cannot serve its disks: {err}") from err
    exports = {}
    for disk in disks:
        node = disk_node(disk.index)
        await monitor.execute(
            "block-export-add",
            {"type": "nbd", "id": EXPORT_PREFIX + str(disk.index), "node-name": node,
             "writable": True, "name": node},
        )  # fmt: skip
        exports[str(disk.index)] = node
    return {"port": port, "exports": exports}


async def close_exports(monitor: Monitor, pid: int | None, port: int) -> None:
    """The source's mirrors have ended: nobody may write these disks from outside now.

    Debian's QEMU 7.2 (CVE-2024-7409's fix, backported) has ``nbd-server-stop``
    wait for every client still negotiating to go, in a loop that does not
    run that client's coroutine: with one, its main loop hangs for good (seen
    here: still hung after 30 s, past the 10 s handshake limit; why, read in
    its source). So the listener is shut first, and no connection can come in
    between ending those there (their end awaited) and the stop: a stranger
    accepted in that gap hung a CI run.
    """
    try:
        async with asyncio.timeout(STOP_TIMEOUT):
            if pid is not None:
                stop_listening(pid, port)
                await _end_connections(pid, port)
            await monitor.execute("nbd-server-stop")
    except (QmpError, OSError, TimeoutError) as err:
        raise MigrationError(
            f"the arriving QEMU of '{monitor.domain}' did not close its disk exports: {err!r}"
        ) from err


async def _end_connections(pid: int, port: int) -> None:
    """Shut every connection to the exports' ``port``; until QEMU has closed them."""
    while fds := socket_fds_on_port(pid, port):
        with contextlib.suppress(OSError):
            shut_down(pid, list(fds))
        await asyncio.sleep(CLOSE_POLL_S)
