"""The relocation channel: JSON lines over TCP, every wait bounded.

Messages are objects with a ``type``. A peer that refuses or fails sends
``{"type": "error", "kind": ..., "message": ...}``; :meth:`Channel.recv`
turns it into the matching local error so the user sees the remote reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from typing import Any

from ferry.errors import MigrationError, MigrationRefused

PROTOCOL_VERSION = 1
MAX_MESSAGE = 1 << 20


class Channel:
    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: str
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.peer = peer

    @classmethod
    async def connect(cls, host: str, port: int, timeout: float) -> Channel:
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(host, port, limit=MAX_MESSAGE), timeout
            )
        except (OSError, TimeoutError) as err:
            reason = "timed out" if isinstance(err, TimeoutError) else (err.strerror or str(err))
            raise MigrationError(
                f"cannot reach relocation server {host}:{port}: {reason}"
            ) from None
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return cls(reader, writer, f"{host}:{port}")

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

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(OSError, ConnectionError):
            await self.writer.wait_closed()


def _no_constant(name: str) -> Any:
    """NaN and Infinity are not JSON: a peer that sends them sent garbage."""
    raise ValueError(f"{name} is not allowed")


def one_line(text: str, limit: int = 500) -> str:
    """An error for a person: one line, control characters shown escaped, bounded.

    Messages may quote what a peer sent; its newlines must not forge lines.
    """
    shown = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    return shown if len(shown) <= limit else shown[: limit - 3] + "..."
