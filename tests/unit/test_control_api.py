"""ferryd's control API over a real unix socket, with a manager that has no domains."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from ferry.config.host import HostConfig
from ferry.daemon.api import ControlServer
from ferry.daemon.services import Services
from ferry.host.layout import HostLayout
from ferry.hypervisor.cmdline import BootFiles


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[ControlServer]:
    layout = HostLayout(tmp_path / "state", tmp_path / "run")
    layout.create()
    host = HostConfig(name="h1", state_dir=layout.state_dir, run_dir=layout.run_dir, accel="tcg")
    services = Services.build(host, layout, lambda cfg: BootFiles(Path("/k"), None))
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
