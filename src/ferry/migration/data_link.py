"""The memory-stream connection: a second TCP connection to the relocation port, for QEMU.

The source opens it with the one-time token the target gave at prepare, and
hands the socket to its QEMU; the target hands its end to its QEMU. The
bytes never pass through Python.
"""

from __future__ import annotations

import asyncio
import json
import socket

from ferry.errors import MigrationError

CONNECT_TIMEOUT = 10.0
READY_TIMEOUT = 90.0
FD_NAME = "ferry-migration"
TCP_NOTSENT_LOWAT = getattr(socket, "TCP_NOTSENT_LOWAT", 25)
NOTSENT_LOWAT_BYTES = 128 * 1024


async def open_data_connection(
    host: str, port: int, migration_id: str, token: str
) -> socket.socket:
    """The memory-stream connection: our header, the target's ``ready``, then raw bytes.

    Returns a blocking socket with nothing read past ``ready``, for QEMU.
    """
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    if not infos:
        raise MigrationError(f"cannot resolve {host}")
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setblocking(False)
    try:
        await asyncio.wait_for(loop.sock_connect(sock, address), CONNECT_TIMEOUT)
        header = {"type": "data", "migration_id": migration_id, "token": token}
        await loop.sock_sendall(sock, json.dumps(header).encode() + b"\n")
        reply = b""
        while not reply.endswith(b"\n"):
            # One byte at a time: nothing past the reply may be taken from QEMU.
            chunk = await asyncio.wait_for(loop.sock_recv(sock, 1), READY_TIMEOUT)
            if not chunk:
                raise MigrationError(f"{host} closed the data connection")
            reply += chunk
            if len(reply) > 4096:
                raise MigrationError(f"{host} sent a malformed data-connection reply")
        if reply.strip() != b"ready":
            raise MigrationError(f"{host} refused the data connection: {reply.strip().decode()}")
    except (OSError, TimeoutError) as err:
        sock.close()
        raise MigrationError(f"data connection to {host}:{port} failed: {err}") from None
    except BaseException:
        sock.close()
        raise
    # Keep little unsent data queued in the kernel: QEMU then sees the link's
    # real rate, its downtime estimate holds, and the final copy does not sit
    # in a socket buffer (megabytes, hundreds of ms on 100 Mbit) after the
    # source has stopped the VM.
    sock.setsockopt(socket.IPPROTO_TCP, TCP_NOTSENT_LOWAT, NOTSENT_LOWAT_BYTES)
    sock.setblocking(True)
    return sock
