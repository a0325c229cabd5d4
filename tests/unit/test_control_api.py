"""ferryd's control API over a real unix socket, with a manager that has no domains."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from ferry.client.daemon_client import DaemonClient, split_host
from ferry.config.host import ControlConfig, HostConfig
from ferry.daemon.api import ControlServer
from ferry.daemon.services import Services
from ferry.errors import AccessDenied, DaemonUnreachable
from ferry.host.layout import HostLayout
from ferry.hypervisor.cmdline import BootFiles
from ferry.pki.credentials import Credentials
from ferry.pki.identity import Role

from .pki_support import TestCA


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[ControlServer]:
    layout = HostLayout(tmp_path / "state", tmp_path / "run")
    layout.create()
    host = HostConfig(name="h1", state_dir=layout.state_dir, run_dir=layout.run_dir, accel="tcg")
    services = Services.build(host, layout, lambda cfg: BootFiles(Path("/k"), None), None)
    srv = ControlServer(services, layout.control_socket)
    await srv.start()
    yield srv
    await srv.close()


async def exchange(srv: ControlServer, *lines: bytes) -> list[dict[str, object]]:
    reader, writer = await asyncio.open_unix_connection(str(srv.socket_path))
    replies = []
    for line in lines:
        writer.write(line + b"\n")
        await writer.drain()
        replies.append(json.loads(await reader.readline()))
    writer.close()
    await writer.wait_closed()
    return replies


async def test_socket_is_root_only(server: ControlServer) -> None:
    assert server.socket_path.stat().st_mode & 0o777 == 0o600
    assert server.socket_path.parent.stat().st_mode & 0o777 == 0o700


async def test_ping_and_list(server: ControlServer) -> None:
    ping, listing = await exchange(server, b'{"op": "ping"}', b'{"op": "list"}')
    assert ping["ok"] is True and ping["result"]["host"] == "h1"  # type: ignore[index]
    assert listing == {"ok": True, "result": []}


@pytest.mark.parametrize(
    ("line", "kind", "text"),
    [
        (b"not json", "ProtocolError", "malformed request"),
        (b"[1, 2]", "ProtocolError", "JSON object"),
        (b'{"op": "reboot-the-world"}', "ProtocolError", "unknown request"),
        (b'{"op": "pause", "args": []}', "ProtocolError", "'args' must be an object"),
        (b'{"op": "pause", "args": {}}', "ProtocolError", "'name' must be a str"),
        (b'{"op": "pause", "args": {"name": "ghost"}}', "DomainNotFound", "'ghost' does not exist"),
        (
            b'{"op": "create", "args": {"config": {"name": "x", "memory": "lots"}}}',
            "ConfigError",
            "'memory'",
        ),
    ],
)
async def test_bad_requests_get_one_line_errors_and_the_connection_lives(
    server: ControlServer, line: bytes, kind: str, text: str
) -> None:
    error, ping = await exchange(server, line, b'{"op": "ping"}')
    assert error["ok"] is False
    assert error["error"]["type"] == kind  # type: ignore[index]
    message = error["error"]["message"]  # type: ignore[index]
    assert text in message and "\n" not in message
    assert ping["ok"] is True


# -- the TCP port: mutual TLS, admin and viewer certificates ---------------------


@pytest.fixture
async def remote(tmp_path: Path) -> AsyncIterator[tuple[ControlServer, TestCA]]:
    ca = TestCA(tmp_path / "pki")
    layout = HostLayout(tmp_path / "state", tmp_path / "run")
    layout.create()
    host = HostConfig(name="h1", state_dir=layout.state_dir, run_dir=layout.run_dir, accel="tcg")
    creds = ca.credentials("h1")
    services = Services.build(host, layout, lambda cfg: BootFiles(Path("/k"), None), creds)
    srv = ControlServer(services, layout.control_socket, ControlConfig(address="127.0.0.1", port=0))
    await srv.start()
    yield srv, ca
    await srv.close()


async def tls_exchange(
    srv: ControlServer, who: Credentials | None, *lines: bytes
) -> list[dict[str, Any]]:
    assert srv.tcp is not None
    context = who.client_context() if who is not None else None
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", srv.tcp.port, ssl=context, server_hostname="" if context else None
    )
    replies = []
    for line in lines:
        writer.write(line + b"\n")
        await writer.drain()
        reply = await asyncio.wait_for(reader.readline(), 5)
        replies.append(json.loads(reply) if reply else {"closed": True})
    writer.close()
    return replies


async def test_a_viewer_reads_and_changes_nothing(
    remote: tuple[ControlServer, TestCA],
) -> None:
    srv, ca = remote
    viewer = ca.credentials("vic", Role.VIEWER)
    listing, pause, everything, hosts = await tls_exchange(
        srv, viewer, b'{"op": "list"}', b'{"op": "pause", "args": {"name": "ghost"}}',
        b'{"op": "list_all"}', b'{"op": "host_list"}',
    )  # fmt: skip
    assert listing == {"ok": True, "result": []}
    assert everything == {"ok": True, "result": []}
    # A host with no etcd says so: nothing keeps another host from its domains.
    [host] = hosts["result"]  # type: ignore[misc]
    assert host["host"] == "h1" and host["mode"].startswith("standalone (local ownership only")
    assert pause["error"] == {  # type: ignore[comparison-overlap]
        "type": "AccessDenied",
        "message": "viewer vic may not 'pause': only an admin's certificate may",
    }


async def test_an_admin_may_ask_everything(remote: tuple[ControlServer, TestCA]) -> None:
    srv, ca = remote
    admin = ca.credentials("ada", Role.ADMIN)
    [pause] = await tls_exchange(srv, admin, b'{"op": "pause", "args": {"name": "ghost"}}')
    # Allowed, and answered by the domain table itself.
    assert pause["error"]["type"] == "DomainNotFound"  # type: ignore[index]


async def test_hosts_plain_clients_and_revoked_operators_are_refused(
    remote: tuple[ControlServer, TestCA],
) -> None:
    srv, ca = remote
    [host] = await tls_exchange(srv, ca.credentials("h2"), b'{"op": "list"}')
    assert host["error"]["type"] == "AccessDenied"  # type: ignore[index]
    assert "carries no operator rights" in host["error"]["message"]  # type: ignore[index]
    [plain] = await tls_exchange(srv, None, b'{"op": "list"}')
    assert plain["error"]["type"] == "AccessDenied"  # type: ignore[index]
    assert "over TLS only" in plain["error"]["message"]  # type: ignore[index]
    admin = ca.credentials("eve", Role.ADMIN)
    ca.ca.revoke("eve")
    assert srv.services.credentials is not None
    ca.publish_crl(srv.services.credentials)
    [revoked] = await tls_exchange(srv, admin, b'{"op": "list"}')
    assert revoked["error"]["type"] == "AccessDenied"  # type: ignore[index]
    assert "admin eve" in revoked["error"]["message"]  # type: ignore[index]
    assert "is revoked" in revoked["error"]["message"]  # type: ignore[index]


async def test_the_station_client_over_tls(remote: tuple[ControlServer, TestCA]) -> None:
    """DaemonClient as `ferry --host` uses it: the host must be the one asked for."""
    srv, ca = remote
    assert srv.tcp is not None
    where = ("127.0.0.1", srv.tcp.port)
    admin = DaemonClient(remote=where, credentials=ca.credentials("ada", Role.ADMIN))
    assert (await asyncio.to_thread(admin.call, "ping"))["host"] == "h1"
    viewer = DaemonClient(remote=where, credentials=ca.credentials("vic", Role.VIEWER))
    with pytest.raises(AccessDenied, match="viewer vic may not 'destroy'"):
        await asyncio.to_thread(viewer.call, "destroy", name="x")
    # Asked for "localhost", h1's certificate (127.0.0.1 only) does not prove it.
    wrong = DaemonClient(
        remote=("localhost", srv.tcp.port), credentials=ca.credentials("al", Role.ADMIN)
    )
    with pytest.raises(DaemonUnreachable, match="not of host localhost"):
        await asyncio.to_thread(wrong.call, "ping")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("h1", ("h1", 8003)),
        ("h1:9000", ("h1", 9000)),
        ("[::1]:9", ("::1", 9)),
        ("::1", ("::1", 8003)),
    ],
)
def test_split_host(text: str, expected: tuple[str, int]) -> None:
    assert split_host(text) == expected
