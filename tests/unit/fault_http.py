"""A loopback HTTP server that streams a body with injected faults, for the player's tests.

Its pauses (``time.sleep``) are the faults themselves: pacing at a given rate
and a source that stops for ``stall_s``; they do not wait for any state. The one
state it waits for is the player's kernel acknowledging every byte before a
reset, so that what the player received does not depend on how fast it reads.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import socket
import socketserver
import struct
import termios
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from ferry.util.wait import wait_until_sync


def unacknowledged(sock: socket.socket) -> int:
    """Bytes in the socket's send queue the peer has not acknowledged (SIOCOUTQ)."""
    queued: int = struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0" * 4))[0]
    return queued


@dataclass
class Faults:
    """What the fault server does to the stream; every fault fires once."""

    rate: float = 0.0  # bytes per second after the burst; 0 sends as fast as it can
    burst: int = 0
    stall_at: int | None = None
    stall_s: float = 0.0
    reset_at: int | None = None
    refuse_after_reset: bool = False
    truncate: int = 0
    alter_at: int | None = None
    manifest: bool = True
    requests: list[tuple[str, str | None]] = field(default_factory=list)
    fired: set[str] = field(default_factory=set)
    stall_began: float | None = None


class FaultHandler(socketserver.BaseRequestHandler):
    server: FaultServer

    def handle(self) -> None:
        sock: socket.socket = self.request
        sock.settimeout(10)
        head = b""
        while b"\r\n\r\n" not in head:
            data = sock.recv(4096)
            if not data:
                return
            head += data
        lines = head.decode("latin-1").split("\r\n")
        path = lines[0].split(" ")[1]
        headers = {
            k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:] if x)
        }
        f = self.server.faults
        f.requests.append((path, headers.get("range")))
        if path.endswith(".json"):
            body = self.server.manifest if f.manifest else None
            if body is None:
                sock.sendall(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
            else:
                sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            return
        if "reset" in f.fired and f.refuse_after_reset:
            sock.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n")
            return
        body = self.server.body
        offset = 0
        if headers.get("range"):
            offset = int(headers["range"].removeprefix("bytes=").rstrip("-"))
            status = (
                f"206 Partial Content\r\nContent-Range: bytes {offset}-{len(body) - 1}/{len(body)}"
            )
        else:
            status = "200 OK"
        sock.sendall(f"HTTP/1.1 {status}\r\nContent-Length: {len(body) - offset}\r\n\r\n".encode())
        self.send(sock, body, offset)

    def send(self, sock: socket.socket, body: bytes, pos: int) -> None:
        f = self.server.faults
        start, sent = time.monotonic(), 0
        while pos < len(body):
            end = min(len(body), pos + 2048)
            for name, at in (("stall", f.stall_at), ("reset", f.reset_at)):
                if at is not None and name not in f.fired and pos < at < end:
                    end = at
            if f.rate:
                delay = start + (sent + end - pos - f.burst) / f.rate - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
            sock.sendall(body[pos:end])
            sent += end - pos
            pos = end
            if pos == f.stall_at and "stall" not in f.fired:
                f.fired.add("stall")
                f.stall_began = time.monotonic()
                time.sleep(f.stall_s)
                # Like a paused source that comes back: a fresh burst, then the same rate.
                start, sent = time.monotonic(), 0
            if pos == f.reset_at and "reset" not in f.fired:
                # A reset throws away what the kernel has not sent yet: how much
                # would depend on how fast the player reads. Every byte up to
                # reset_at reaches the player first.
                wait_until_sync(
                    lambda: unacknowledged(sock) == 0,
                    timeout=10,
                    what=f"the player to acknowledge {pos} bytes before the reset",
                    interval=0.002,
                )
                f.fired.add("reset")
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                sock.close()
                return


class FaultServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, media: bytes, duration: float, faults: Faults) -> None:
        self.faults = faults
        self.body = media
        if faults.truncate:
            self.body = media[: -faults.truncate]
        if faults.alter_at is not None:
            b = bytearray(media)
            b[faults.alter_at] ^= 0xFF
            self.body = bytes(b)
        self.manifest = json.dumps(
            {"duration": duration, "size": len(media), "sha256": hashlib.sha256(media).hexdigest()}
        ).encode()
        super().__init__(("127.0.0.1", 0), FaultHandler)

    def process_request(
        self, request: socket.socket | tuple[bytes, socket.socket], client_address: Any
    ) -> None:
        assert isinstance(request, socket.socket)
        # A small send buffer keeps the server's notion of "sent" close to the player's.
        request.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8192)
        request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        super().process_request(request, client_address)


@contextmanager
def fault_server(media: bytes, duration: float, faults: Faults) -> Iterator[str]:
    server = FaultServer(media, duration, faults)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/movie.ogg"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
