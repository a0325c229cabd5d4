"""`ferry dashboard` against two real hosts' services (etcd, mutual TLS, fake QEMUs), looked at
in a real headless Chromium: a migration is seen moving while it happens.

Screenshots are kept in test-logs/<test>/ whether the test passes or not.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import shutil
import socket
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from ferry.client.daemon_client import DaemonClient
from ferry.config.host import ControlConfig
from ferry.daemon.api import ControlServer
from ferry.dashboard.cluster_view import ClusterView, Source
from ferry.dashboard.server import loopback_socket, serve
from ferry.errors import FerryError
from ferry.host.layout import HostLayout
from ferry.pki.identity import Role

from .chromium_cdp import CHROMIUM, Browser
from .etcd_support import EtcdMember
from .migration_harness import Cluster, running, until
from .pki_support import TestCA

REPO = Path(__file__).resolve().parents[2]
HOLD_AT = 256 * 1024
# The migration's row once its transfer shows bytes sent (the text, else nothing).
MIDWAY = """(t => t && t.includes('transfer') && t.includes('MiB') ? t : null)(
    document.querySelector('[data-migration=vm]')?.innerText)"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[tuple[Cluster, TestCA]]:
    """Two hosts on one etcd, each with its control API on TLS (as a station reaches it)."""
    ca = TestCA(tmp_path / "etcd-pki")
    c = Cluster(tmp_path, etcd=["https://127.0.0.1:1"])
    c.ca = ca
    for host in c.hosts:
        host.credentials = ca.credentials(host.name)
        host.config = replace(
            host.config, control=ControlConfig(address="127.0.0.1", port=free_port())
        )
    member = EtcdMember(tmp_path / "etcd", tls=ca.credentials("etcd").dir)
    member.enable_auth(ca.credentials("root", Role.VIEWER).dir, [h.name for h in c.hosts])
    c.use_etcd(member.url)
    servers: list[ControlServer] = []
    try:
        async with running(c) as started:
            for host in started.hosts:
                layout = HostLayout(host.config.state_dir, host.config.run_dir)
                servers.append(ControlServer(host.s, layout.control_socket, host.config.control))
                await servers[-1].start()
            await until(lambda: len(_hosts(started, ca)) == 2, "both hosts in etcd")
            yield started, ca
            for server in servers:
                await server.close()
    finally:
        member.stop()


def _hosts(c: Cluster, ca: TestCA) -> list[Any]:
    try:
        return list(_client(c, ca.credentials("alice", Role.ADMIN)).call("host_list"))
    except FerryError:
        return []


def _client(c: Cluster, credentials: Any) -> DaemonClient:
    port = c.hosts[0].config.control.port
    return DaemonClient(remote=("127.0.0.1", port), credentials=credentials, timeout=5)


@contextlib.asynccontextmanager
async def dashboard(c: Cluster, ca: TestCA, role: Role) -> AsyncIterator[str]:
    credentials = ca.credentials(f"op-{role.value}", role)
    source = Source(lambda: _client(c, credentials), credentials, role.value)
    url: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(serve(ClusterView(source), "127.0.0.1", 0, url.set_result))
    try:
        yield await asyncio.wait_for(url, 10)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def kept(request: pytest.FixtureRequest) -> Path:
    path = REPO / "test-logs" / re.sub(r"[^\w.-]+", "_", request.node.nodeid)
    shutil.rmtree(path, ignore_errors=True)
    return path


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium here (scripts/setup.sh installs it)")
async def test_the_page_shows_a_migration_moving_while_it_happens(
    cluster: tuple[Cluster, TestCA], request: pytest.FixtureRequest
) -> None:
    c, ca = cluster
    h1, h2 = c.hosts
    shots = kept(request)
    await h1.s.lifecycle.create(c.domain())
    async with dashboard(c, ca, Role.ADMIN) as url:
        browser = await asyncio.to_thread(Browser)
        try:
            await asyncio.to_thread(browser.open, url)
            show = browser.wait_for
            await asyncio.to_thread(
                show, "document.querySelector('[data-domain=vm]')?.dataset.on === 'h1'", 10,
                "vm on h1",
            )  # fmt: skip
            c.plan(source={"hold_at": HOLD_AT})
            task = asyncio.create_task(h1.migrate("vm", h2))
            # Pushed, not reloaded: the same page now shows the migration midway.
            row = await asyncio.to_thread(
                show, MIDWAY, 15, "the migration transferring",
            )  # fmt: skip
            assert "h1 →" in row and "transfer" in row, row
            assert (
                await asyncio.to_thread(
                    browser.evaluate, "document.getElementById('live').textContent"
                )
                == "live"
            )
            await asyncio.to_thread(browser.screenshot, shots / "1-migration-midway.png")
            c.release()
            await task
            await asyncio.to_thread(
                show, "document.querySelector('[data-domain=vm]')?.dataset.on === 'h2'", 15,
                "vm on h2",
            )  # fmt: skip
            done = await asyncio.to_thread(
                show, "document.querySelector('[data-recent=vm]')?.innerText", 10, "the result"
            )
            assert "completed" in done, done
            assert not await asyncio.to_thread(
                browser.evaluate, "document.querySelector('[data-migration=vm]')"
            )
            buttons = await asyncio.to_thread(
                browser.evaluate, "[...document.querySelectorAll('button')].map(b => b.textContent)"
            )
            assert "Pause" in buttons and "Evacuate" in buttons, buttons
            await asyncio.to_thread(browser.screenshot, shots / "2-arrived.png")
            # Its Migrate button (admins only) sends it back.
            await asyncio.to_thread(
                browser.evaluate,
                "document.querySelector('[data-domain=vm] button:last-child').click()",
            )
            await asyncio.to_thread(
                show, "document.querySelector('[data-domain=vm]')?.dataset.on === 'h1'", 20,
                "vm back on h1",
            )  # fmt: skip
            await asyncio.to_thread(browser.screenshot, shots / "3-back-by-its-button.png")
        finally:
            await asyncio.to_thread(browser.close)
    await c.assert_runs_once("h1")


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium here (scripts/setup.sh installs it)")
async def test_a_viewer_sees_no_buttons_and_cannot_act(
    cluster: tuple[Cluster, TestCA], request: pytest.FixtureRequest
) -> None:
    c, ca = cluster
    await c.hosts[0].s.lifecycle.create(c.domain())
    async with dashboard(c, ca, Role.VIEWER) as url:
        browser = await asyncio.to_thread(Browser)
        try:
            await asyncio.to_thread(browser.open, url)
            await asyncio.to_thread(
                browser.wait_for, "!!document.querySelector('[data-domain=vm]')", 10, "vm"
            )
            assert (
                await asyncio.to_thread(
                    browser.evaluate, "document.querySelectorAll('button').length"
                )
                == 0
            )
            assert "viewer" in await asyncio.to_thread(
                browser.evaluate, "document.getElementById('role').textContent"
            )
            await asyncio.to_thread(browser.screenshot, kept(request) / "viewer.png")
        finally:
            await asyncio.to_thread(browser.close)
        token = await asyncio.to_thread(_token, url)
        status, _ = await asyncio.to_thread(_post, url, {"op": "pause", "name": "vm"}, token)
        assert status == 403
    await c.assert_runs_once("h1")


async def test_actions_need_the_pages_token_and_its_own_host_name(
    cluster: tuple[Cluster, TestCA],
) -> None:
    c, ca = cluster
    h1 = c.hosts[0]
    await h1.s.lifecycle.create(c.domain())
    async with dashboard(c, ca, Role.ADMIN) as url:
        token = await asyncio.to_thread(_token, url)
        pause = {"op": "pause", "name": "vm"}
        assert (await asyncio.to_thread(_post, url, pause, "forged"))[0] == 403
        # A name pointed at 127.0.0.1 by another site (DNS rebinding) is not ours.
        assert (await asyncio.to_thread(_post, url, pause, token, "evil.example:80"))[0] == 403
        assert (await asyncio.to_thread(_get, url, "evil.example"))[0] == 421
        assert (await asyncio.to_thread(_post, url, {"op": "rm -rf"}, token))[0] == 400
        status, answer = await asyncio.to_thread(_post, url, pause, token)
        assert status == 200, answer
        assert h1.s.table.get("vm").record.state.value == "paused"
        # The event stream carries the state as JSON.
        first = await asyncio.to_thread(_first_event, url)
        assert any(d["name"] == "vm" and d["state"] == "paused" for d in first["domains"])


def test_the_dashboard_listens_on_loopback_only() -> None:
    with pytest.raises(FerryError, match="loopback only"):
        loopback_socket("0.0.0.0", 0)
    loopback_socket("127.0.0.1", 0).close()


def _request(url: str, path: str, host: str | None, **kwargs: Any) -> urllib.request.Request:
    request = urllib.request.Request(url.rstrip("/") + path, **kwargs)
    if host:
        request.add_header("Host", host)
    return request


def _get(url: str, host: str | None = None) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(_request(url, "/", host), timeout=10) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def _token(url: str) -> str:
    found = re.search(r'name="ferry-token" content="([^"]+)"', _get(url)[1])
    assert found is not None
    return found.group(1)


def _post(url: str, body: dict[str, Any], token: str, host: str | None = None) -> tuple[int, Any]:
    headers = {"X-Ferry-Token": token, "Content-Type": "application/json"}
    data = json.dumps(body).encode()
    request = _request(url, "/api/action", host, data=data, method="POST", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


def _first_event(url: str) -> Any:
    with urllib.request.urlopen(_request(url, "/events", None), timeout=10) as stream:
        for line in stream:
            if line.startswith(b"data: "):
                return json.loads(line[6:])
    raise AssertionError("no event")
