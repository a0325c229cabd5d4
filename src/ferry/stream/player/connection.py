"""HTTP/1.1 for the player: one GET (ranged when resuming), its head, then the body."""

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


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter


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
    try:
        infos = await loop.getaddrinfo(url.host, url.port, family=sock.family)
        async with asyncio.timeout(timeout):
            await loop.sock_connect(sock, infos[0][4])
        reader, writer = await asyncio.open_connection(sock=sock, limit=READ_SIZE * 2)
    except (OSError, TimeoutError) as err:
        sock.close()
        raise StreamBroken(f"connect to {url.authority}: {err or 'timed out'}") from err
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
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        await writer.drain()
        async with asyncio.timeout(timeout):
            head = await reader.readuntil(b"\r\n\r\n")
    except (OSError, TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as err:
        writer.close()
        raise StreamBroken(f"request to {url.authority}: {err or 'timed out'}") from err
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    fields = status_line.split(" ", 2)
    if len(fields) < 2 or not fields[0].startswith("HTTP/") or not fields[1].isdigit():
        writer.close()
        raise StreamBroken(f"bad status line from {url.authority}: {status_line[:80]!r}")
    headers: dict[str, str] = {}
    for line in header_lines:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    return Response(int(fields[1]), headers, reader, writer)


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
            body = await resp.reader.readexactly(length)
        data = json.loads(body)
    except (OSError, TimeoutError, ValueError, asyncio.IncompleteReadError):
        return None
    finally:
        resp.writer.close()
    return data if isinstance(data, dict) else None
