"""HTTP/1.1 for the player: one GET (ranged when resuming), its head, then the body.

The body is read straight from the socket, with no stream buffer in between:
the kernel hands out every byte it received before it reports a reset, so a
reset loses nothing the player was sent, and no buffer outside the player's own
accounting hides media from it (asyncio's StreamReader would do both).
"""

from __future__ import annotations

import asyncio
import json
import socket
import urllib.parse
from dataclasses import dataclass
from typing import Any

from .errors import WatchError

USER_AGENT = "ferry-watch/1"
READ_SIZE = 4096
HEADER_LIMIT = 16384
CONNECT_TIMEOUT_S = 10.0


class StreamBroken(Exception):
    """The connection ended or misbehaved; a reconnect may cure it."""


@dataclass
class Url:
    host: str
    port: int
    target: str
    authority: str


def parse_url(url: str) -> Url:
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise WatchError(f"watch {url}: only http://host[:port]/path URLs are supported")
    try:
        port = parts.port or 80
    except ValueError as err:
        raise WatchError(f"watch {url}: bad port") from err
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return Url(parts.hostname, port, target, parts.netloc)


class Response:
    """A response whose head has been read; the body is read with :meth:`read`."""

    def __init__(
        self, status: int, headers: dict[str, str], sock: socket.socket, rest: bytes
    ) -> None:
        self.status = status
        self.headers = headers
        self._sock = sock
        self._rest = rest  # body bytes that came in with the head

    async def read(self, n: int) -> bytes:
        """Up to ``n`` bytes of the body, b"" at its end; OSError if the connection broke."""
        if self._rest:
            data, self._rest = self._rest[:n], self._rest[n:]
            return data
        return await asyncio.get_running_loop().sock_recv(self._sock, n)

    async def read_exactly(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = await self.read(n - len(data))
            if not chunk:
                raise StreamBroken(f"connection closed {n - len(data)} bytes early")
            data += chunk
        return data

    def close(self) -> None:
        self._sock.close()


async def request(
    url: Url, offset: int, recv_buffer: int, timeout: float = CONNECT_TIMEOUT_S
) -> Response:
    """Open a connection, send a GET (ranged from ``offset`` if > 0), read the head."""
    sock = socket.socket(socket.AF_INET6 if ":" in url.host else socket.AF_INET)
    # A small receive buffer keeps the kernel from hiding seconds of media from the
    # player's own buffer accounting.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, recv_buffer)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    lines = [
        f"GET {url.target} HTTP/1.1",
        f"Host: {url.authority}",
        f"User-Agent: {USER_AGENT}",
        "Accept: */*",
        "Connection: close",
    ]
    if offset > 0:
        lines.append(f"Range: bytes={offset}-")
    try:
        async with asyncio.timeout(timeout):
            infos = await loop.getaddrinfo(url.host, url.port, family=sock.family)
            await loop.sock_connect(sock, infos[0][4])
    except (OSError, TimeoutError) as err:
        sock.close()
        raise StreamBroken(f"connect to {url.authority}: {err or 'timed out'}") from err
    try:
        async with asyncio.timeout(timeout):
            await loop.sock_sendall(sock, ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
            head, rest = await _read_head(loop, sock)
    except (OSError, TimeoutError, StreamBroken) as err:
        sock.close()
        raise StreamBroken(f"request to {url.authority}: {err or 'timed out'}") from err
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    fields = status_line.split(" ", 2)
    if len(fields) < 2 or not fields[0].startswith("HTTP/") or not fields[1].isdigit():
        sock.close()
        raise StreamBroken(f"bad status line from {url.authority}: {status_line[:80]!r}")
    headers: dict[str, str] = {}
    for line in header_lines:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    return Response(int(fields[1]), headers, sock, rest)


async def _read_head(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> tuple[bytes, bytes]:
    """The response head (without its blank line) and the body bytes read with it."""
    data = b""
    while True:
        end = data.find(b"\r\n\r\n")
        if end >= 0:
            return data[:end], data[end + 4 :]
        if len(data) > HEADER_LIMIT:
            raise StreamBroken(f"no end of the response head in {HEADER_LIMIT} bytes")
        chunk = await loop.sock_recv(sock, READ_SIZE)
        if not chunk:
            raise StreamBroken("connection closed in the response head")
        data += chunk


async def fetch_manifest(url: str, timeout: float = CONNECT_TIMEOUT_S) -> dict[str, Any] | None:
    """The manifest ``<url>.json`` as a dict, or None when there is none."""
    manifest_url = parse_url(url)
    path, _, query = manifest_url.target.partition("?")
    manifest_url.target = path + ".json" + (f"?{query}" if query else "")
    try:
        resp = await request(manifest_url, 0, 65536, timeout)
    except StreamBroken:
        return None
    try:
        length = int(resp.headers.get("content-length", "-1"))
        if resp.status != 200 or not 0 <= length <= 1 << 20:
            return None
        async with asyncio.timeout(timeout):
            body = await resp.read_exactly(length)
        data = json.loads(body)
    except (OSError, TimeoutError, ValueError, StreamBroken):
        return None
    finally:
        resp.close()
    return data if isinstance(data, dict) else None
