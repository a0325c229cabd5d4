"""Serving the dashboard: uvicorn, on loopback only (the page acts with our credentials)."""

from __future__ import annotations

import ipaddress
import logging
import socket
from collections.abc import Callable

import uvicorn

from ferry.dashboard.app import build_app
from ferry.dashboard.cluster_view import ClusterView
from ferry.errors import FerryError

log = logging.getLogger("ferry.dashboard")


def loopback_socket(address: str, port: int) -> socket.socket:
    """A listening socket on a loopback address; anything else is refused."""
    try:
        loopback = address == "localhost" or ipaddress.ip_address(address).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise FerryError(
            f"the dashboard listens on loopback only, not {address}: it acts with your "
            "credentials (reach it from elsewhere with ssh -L)"
        )
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    try:
        return socket.create_server((address, port), family=family)
    except OSError as err:
        raise FerryError(
            f"the dashboard cannot listen on {address}:{port}: {err.strerror}"
        ) from err


async def serve(
    view: ClusterView,
    address: str,
    port: int,
    ready: Callable[[str], None] | None = None,
    listen_fd: int | None = None,
) -> None:
    """Serve until cancelled; ``listen_fd``: a listening socket given to us, used as it is."""
    if listen_fd is not None:
        sock = socket.socket(fileno=listen_fd)
        address = str(sock.getsockname()[0])
    else:
        sock = loopback_socket(address, port)
    bound = int(sock.getsockname()[1])
    host = f"[{address}]" if ":" in address else address
    app = build_app(view, lambda: bound)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    if ready is not None:
        ready(f"http://{host}:{bound}/")
    await server.serve(sockets=[sock])
