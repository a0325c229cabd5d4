"""The relocation channel: JSON lines over mutual TLS (plain TCP when insecure), every
wait bounded.

Messages are objects with a ``type``. A peer that refuses or fails sends
``{"type": "error", "kind": ..., "message": ...}``; :meth:`Channel.recv`
turns it into the matching local error so the user sees the remote reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import ssl
from typing import Any

from ferry.errors import MigrationError, MigrationRefused, PkiError
from ferry.pki.credentials import HANDSHAKE_TIMEOUT, Credentials, tls_failure
from ferry.pki.identity import Identity, Role
from ferry.util.text import one_line

# 2: migration settings gained the stream and convergence keys, which a
# version-1 target refuses as unknown; a clear version mismatch says it better.
PROTOCOL_VERSION = 2
MAX_MESSAGE = 1 << 20


class Channel:
    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        peer: str,
        identity: Identity | None = None,
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.peer = peer
        # Whom the peer's certificate names (None: a plain connection).
        self.identity = identity

    @classmethod
    async def connect(
        cls, host: str, port: int, timeout: float, credentials: Credentials | None
    ) -> Channel:
        """A channel to ``host``'s relocation server: mutual TLS unless ``credentials``
        is None (insecure mode); the server must prove, by its certificate, that it
        is a host of our cluster named ``host``."""
        where = f"{host}:{port}"
        try:
            context = credentials.client_context() if credentials is not None else None
            async with asyncio.timeout(timeout):
                reader, writer = await asyncio.open_connection(
                    host,
                    port,
                    limit=MAX_MESSAGE,
                    ssl=context,
                    server_hostname="" if context else None,
                    ssl_handshake_timeout=HANDSHAKE_TIMEOUT if context else None,
                )
        except PkiError as err:
            raise MigrationError(f"cannot open a relocation channel: {err}") from None
        except TimeoutError:
            raise MigrationError(f"cannot reach relocation server {where}: timed out") from None
        except ssl.SSLError as err:
            raise MigrationRefused(
                f"TLS with relocation server {where} failed: {tls_failure(err)}"
            ) from None
        except OSError as err:
            reason = err.strerror or str(err) or "the connection was closed during the handshake"
            raise MigrationError(f"cannot reach relocation server {where}: {reason}") from None
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        channel = cls(reader, writer, where)
        if credentials is not None:
            try:
                channel.identity = _server_identity(credentials, writer, host)
            except PkiError as err:
                await channel.close()
                raise MigrationRefused(f"relocation server {where}: {err}") from None
        return channel

    async def send(self, message: dict[str, Any]) -> None:
        try:
            self.writer.write(json.dumps(message).encode() + b"\n")
            await self.writer.drain()
        except (OSError, ConnectionError) as err:
            raise MigrationError(f"connection to {self.peer} lost while sending: {err}") from None

    async def send_error(self, err: Exception) -> None:
        kind = "refused" if isinstance(err, MigrationRefused) else "error"
        # A peer that is gone learns from the closed connection instead.
        with contextlib.suppress(MigrationError):
            await self.send({"type": "error", "kind": kind, "message": one_line(str(err))})

    async def recv(self, timeout: float, expect: str | None = None) -> dict[str, Any]:
        try:
            line = await asyncio.wait_for(self.reader.readline(), timeout)
        except TimeoutError:
            raise MigrationError(f"{self.peer} did not answer within {timeout:.0f} s") from None
        except (OSError, ConnectionError, ValueError) as err:
            raise MigrationError(f"connection to {self.peer} lost: {err}") from None
        if not line:
            raise MigrationError(f"{self.peer} closed the connection")
        try:
            message = json.loads(line, parse_constant=_no_constant)
        except (ValueError, RecursionError):
            # RecursionError: a deep nest of brackets, which json cannot parse.
            raise MigrationError(f"{self.peer} sent a malformed message") from None
        if not isinstance(message, dict) or not isinstance(message.get("type"), str):
            raise MigrationError(f"{self.peer} sent a message without a type")
        if message["type"] == "error":
            text = str(message.get("message", "unknown error"))
            if message.get("kind") == "refused":
                raise MigrationRefused(text)
            raise MigrationError(text)
        if expect is not None and message["type"] != expect:
            raise MigrationError(f"{self.peer} sent {message['type']!r} where '{expect}' was due")
        return message

    def socket(self) -> socket.socket:
        sock = self.writer.get_extra_info("socket")
        assert sock is not None
        return sock  # type: ignore[no-any-return]

    def local_address(self) -> str:
        """This end's IP address: where the peer reached us."""
        return str(self.socket().getsockname()[0])

    def peer_address(self) -> str:
        """The other end's IP address, as connected (no name to resolve again)."""
        return str(self.socket().getpeername()[0])

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(OSError, ConnectionError):
            await self.writer.wait_closed()


def _server_identity(credentials: Credentials, writer: asyncio.StreamWriter, host: str) -> Identity:
    identity = credentials.peer(writer.get_extra_info("ssl_object").getpeercert(binary_form=True))
    if identity.role is not Role.HOST:
        raise PkiError(f"presented the certificate of {identity}, not of a host")
    if not identity.answers_to(host):
        raise PkiError(
            f"presented the certificate of {identity}, which does not name {host!r} "
            f"(it names {', '.join(identity.names())})"
        )
    return identity


def _no_constant(name: str) -> Any:
    """NaN and Infinity are not JSON: a peer that sends them sent garbage."""
    raise ValueError(f"{name} is not allowed")


class PeerWatch:
    """The target while the source streams: it speaks only to fail, and pings keep
    it from taking our silence for a dead source."""

    def __init__(self, channel: Channel, what: str, interval: float) -> None:
        self.channel = channel
        self.interval = interval
        self._last_beat = 0.0
        self._word = asyncio.create_task(channel.recv(timeout=1e9), name=what)

    async def tick(self, now: float) -> None:
        """Raise the target's error if it sent one; ping if it is time."""
        if self._word.done():
            self._word.result()  # raises the target's error
            raise MigrationError(f"{self.channel.peer} spoke out of turn during the transfer")
        if now - self._last_beat >= self.interval:
            await self.channel.send({"type": "ping"})
            self._last_beat = now

    async def close(self) -> None:
        self._word.cancel()
        with contextlib.suppress(asyncio.CancelledError, MigrationError):
            await self._word
