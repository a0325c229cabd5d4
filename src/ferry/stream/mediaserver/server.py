"""The listening server: a thread per connection, a cap on connections, quiet errors."""

from __future__ import annotations

import collections
import contextlib
import socket
import sys
import threading
from http.server import ThreadingHTTPServer
from typing import Any

from .config import Config
from .context import ServerContext
from .handler import MediaHandler


class MediaServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128
    allow_reuse_address = True

    def __init__(self, config: Config) -> None:
        self.ctx = ServerContext(config)
        self.config = config
        self.root = self.ctx.root
        self.stats = self.ctx.stats
        self.slots = threading.BoundedSemaphore(config.max_clients)
        self.per_client: collections.Counter[str] = collections.Counter()
        self.per_client_lock = threading.Lock()
        if ":" in config.bind:
            self.address_family = socket.AF_INET6
        try:
            super().__init__((config.bind, config.port), MediaHandler)
        except OSError:
            self.ctx.access_log.close()
            raise
        self.ctx.address = self.address()

    def address(self) -> str:
        """``host:port`` actually listened on (the port may have been 0)."""
        host, port = self.socket.getsockname()[:2]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    def process_request(self, request: Any, client_address: Any) -> None:
        client = str(client_address[0])
        if not self._take_client(client):
            self._refuse(request)
            return
        if not self.slots.acquire(blocking=False):
            self._drop_client(client)
            self._refuse(request)
            return
        try:
            super().process_request(request, client_address)
        except Exception:
            self.slots.release()
            self._drop_client(client)
            raise

    def _refuse(self, request: Any) -> None:
        # Refusing fast keeps a flood of connections from starving served clients.
        with contextlib.suppress(OSError):
            request.sendall(
                b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n"
                b"Connection: close\r\n\r\n"
            )
        self.shutdown_request(request)

    def _take_client(self, client: str) -> bool:
        with self.per_client_lock:
            if self.per_client[client] >= self.config.max_per_client:
                return False
            self.per_client[client] += 1
            return True

    def _drop_client(self, client: str) -> None:
        with self.per_client_lock:
            self.per_client[client] -= 1
            if self.per_client[client] <= 0:
                del self.per_client[client]

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()
            self._drop_client(str(client_address[0]))

    def handle_error(self, request: Any, client_address: Any) -> None:
        err = sys.exc_info()[1]
        if isinstance(err, OSError):
            # Clients vanish mid-request all the time; that is no server fault.
            return
        print(
            f"ferry-media-server: error serving {client_address[0]}: {err!r}",
            file=sys.stderr,
            flush=True,
        )

    def server_close(self) -> None:
        super().server_close()
        self.ctx.access_log.close()
