"""A TCP listener for ferryd's network channels: mutual TLS, bounded before anyone is trusted.

Each connection is TLS when its first byte opens a TLS handshake (0x16) and
plain otherwise: the relocation port also takes the memory-stream
connections, which stay plain for Python because QEMU runs its own TLS on
them. What a plain connection may do is the caller's decision.

Before a peer has proved anything it gets little: a bounded number of
connections (in all and per address), a deadline for its first byte and for
its handshake, and no thread of ours.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import ipaddress
import logging
import socket
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from ferry.errors import FerryError, PkiError
from ferry.pki.credentials import HANDSHAKE_TIMEOUT, Credentials, tls_failure
from ferry.pki.identity import Identity

log = logging.getLogger("ferryd")

TLS_HANDSHAKE_BYTE = 0x16
BACKLOG = 128
REFUSAL_LOG_S = 10.0


@dataclass(frozen=True)
class Limits:
    total: int = 64
    per_peer: int = 8
    first_byte_s: float = HANDSHAKE_TIMEOUT
    handshake_s: float = HANDSHAKE_TIMEOUT
    line: int = 1 << 20  # the longest line a reader buffers


@dataclass
class Connection:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    address: str
    # Whom the peer's certificate names; None on a plain connection.
    peer: Identity | None
    # Why the connection may do nothing (a revoked certificate, say): the
    # handler answers it in its own protocol and closes.
    refusal: str | None = None


Handler = Callable[[Connection], Awaitable[None]]


def plain_address(address: str) -> str:
    """An IPv4 peer of a dual-stack socket appears as ::ffff:a.b.c.d: show a.b.c.d."""
    try:
        ip = ipaddress.ip_address(address.split("%")[0])
    except ValueError:
        return address
    mapped = getattr(ip, "ipv4_mapped", None)
    return str(mapped) if mapped is not None else str(ip)


def listening_socket(address: str, port: int) -> socket.socket:
    """All addresses (both families where the host has IPv6) for '', else that address."""
    if not address:
        if socket.has_dualstack_ipv6():
            with contextlib.suppress(OSError):
                return socket.create_server(
                    ("", port), family=socket.AF_INET6, dualstack_ipv6=True, backlog=BACKLOG
                )
        return socket.create_server(("0.0.0.0", port), backlog=BACKLOG)
    infos = socket.getaddrinfo(address, port, type=socket.SOCK_STREAM)
    family, _, _, _, where = infos[0]
    return socket.create_server(where[:2], family=family, backlog=BACKLOG)


class Listener:
    def __init__(
        self,
        what: str,
        address: str,
        port: int,
        credentials: Credentials | None,
        handler: Handler,
        limits: Limits | None = None,
    ) -> None:
        self.what = what
        self.address = address
        self.credentials = credentials
        self.handler = handler
        self.limits = limits or Limits()
        self._wanted_port = port
        self._sock: socket.socket | None = None
        self._accepting: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._per_peer: collections.Counter[str] = collections.Counter()
        self._refused = 0
        self._refused_logged_at = -REFUSAL_LOG_S

    async def start(self) -> None:
        try:
            sock = listening_socket(self.address, self._wanted_port)
        except OSError as err:
            where = f"{self.address or '*'}:{self._wanted_port}"
            raise FerryError(f"cannot listen for {self.what} on {where}: {err.strerror}") from err
        sock.setblocking(False)
        self._sock = sock
        self._accepting = asyncio.create_task(self._accept_loop(), name=f"{self.what} listener")
        mode = "mutual TLS" if self.credentials else "NO TLS (insecure)"
        log.info("%s on %s:%d, %s", self.what, self.address or "*", self.port, mode)

    @property
    def port(self) -> int:
        assert self._sock is not None
        return int(self._sock.getsockname()[1])

    async def close(self) -> None:
        if self._accepting is not None:
            self._accepting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._accepting
        if self._sock is not None:
            self._sock.close()
        for task in list(self._tasks):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._sock is not None
        while True:
            try:
                conn, where = await loop.sock_accept(self._sock)
            except OSError as err:
                # Out of descriptors, say: refuse for a moment rather than spin.
                log.warning("%s: accept failed: %s", self.what, err)
                await asyncio.sleep(0.1)
                continue
            address = plain_address(str(where[0]))
            if len(self._tasks) >= self.limits.total or (
                self._per_peer[address] >= self.limits.per_peer
            ):
                conn.close()
                self._note_refusal(address)
                continue
            task = asyncio.create_task(
                self._serve(conn, address), name=f"{self.what} connection from {address}"
            )
            self._tasks.add(task)
            self._per_peer[address] += 1
            task.add_done_callback(functools.partial(self._done, address=address))

    def _note_refusal(self, address: str) -> None:
        """Count refusals; say so at most every REFUSAL_LOG_S (a flood must not flood the log)."""
        self._refused += 1
        now = time.monotonic()
        if now - self._refused_logged_at >= REFUSAL_LOG_S:
            log.warning(
                "%s: refused %d connection(s) in the last %.0f s: too many "
                "(in all, or from one address; the latest from %s)",
                self.what, self._refused, REFUSAL_LOG_S, address,
            )  # fmt: skip
            self._refused, self._refused_logged_at = 0, now

    def _done(self, task: asyncio.Task[None], *, address: str) -> None:
        self._tasks.discard(task)
        self._per_peer[address] -= 1
        if self._per_peer[address] <= 0:
            del self._per_peer[address]
        if not task.cancelled() and task.exception() is not None:
            log.error("%s: connection from %s failed", self.what, address,
                      exc_info=task.exception())  # fmt: skip

    async def _serve(self, conn: socket.socket, address: str) -> None:
        conn.setblocking(False)
        try:
            first = await self._first_byte(conn)
        except (TimeoutError, OSError):
            conn.close()
            return
        if not first:
            conn.close()
            return
        tls = first[0] == TLS_HANDSHAKE_BYTE
        if tls and self.credentials is None:
            log.warning("%s: %s opened TLS, but this host runs insecure", self.what, address)
            conn.close()
            return
        try:
            reader, writer = await self._streams(conn, tls)
        except (ssl.SSLError, OSError, ConnectionError, TimeoutError, PkiError) as err:
            log.warning("%s: TLS handshake with %s failed: %s", self.what, address,
                        tls_failure(err))  # fmt: skip
            conn.close()
            return
        peer, refusal = None, None
        if tls:
            assert self.credentials is not None
            try:
                der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
                peer = self.credentials.peer(der)
            except PkiError as err:
                log.warning("%s: %s refused: %s", self.what, address, err)
                refusal = str(err)
        try:
            await self.handler(Connection(reader, writer, address, peer, refusal))
        finally:
            writer.close()
            with contextlib.suppress(OSError, ConnectionError):
                await writer.wait_closed()

    async def _first_byte(self, conn: socket.socket) -> bytes:
        """Wait (bounded) until the peer sends, and look at its first byte without taking it."""
        loop = asyncio.get_running_loop()
        readable: asyncio.Future[None] = loop.create_future()

        def ready() -> None:
            if not readable.done():
                readable.set_result(None)

        loop.add_reader(conn.fileno(), ready)
        try:
            async with asyncio.timeout(self.limits.first_byte_s):
                await readable
        finally:
            loop.remove_reader(conn.fileno())
        return conn.recv(1, socket.MSG_PEEK)

    async def _streams(
        self, conn: socket.socket, tls: bool
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=self.limits.line, loop=loop)
        protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
        context = None
        if tls:
            assert self.credentials is not None
            context = self.credentials.server_context()
        async with asyncio.timeout(self.limits.handshake_s + 1):
            transport, _ = await loop.connect_accepted_socket(
                lambda: protocol,
                conn,
                ssl=context,
                ssl_handshake_timeout=self.limits.handshake_s if tls else None,
            )
        return reader, asyncio.StreamWriter(transport, protocol, reader, loop)
