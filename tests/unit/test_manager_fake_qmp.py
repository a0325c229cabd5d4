"""The lifecycle requests of ferryd against a fake QMP peer."""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from ferry.config.host import HostConfig
from ferry.daemon.services import Services
from ferry.domain.config import DomainConfig
from ferry.domain.state import DomainState
from ferry.errors import DomainNotFound, InvalidTransition, QmpError
from ferry.host.layout import HostLayout
from ferry.host.record import DomainRecord, load_record
from ferry.host.running import RunningDomain
from ferry.hypervisor.cmdline import BootFiles
from ferry.hypervisor.monitor import Monitor
from ferry.util.wait import wait_until

from .fake_qmp import FakeQmpPeer


@pytest.fixture
async def setup(tmp_path: Path) -> AsyncIterator[tuple[Services, FakeQmpPeer]]:
    layout = HostLayout(tmp_path / "state", tmp_path / "run")
    layout.create()
    host = HostConfig(
        name="testhost", state_dir=layout.state_dir, run_dir=layout.run_dir, accel="tcg"
    )
    services = Services.build(host, layout, lambda cfg: BootFiles(Path("/k"), None), None)
    peer = FakeQmpPeer(tmp_path / "qmp.sock")
    await peer.start()
    monitor = Monitor("vm")
    await monitor.connect(peer.path, 5)
    record = DomainRecord(
        config=DomainConfig.from_mapping({"name": "vm"}),
        domid=1,
        state=DomainState.RUNNING,
        started_at=time.time(),
        taps=[],
        accel="tcg",
        pid=os.getpid(),
    )
    services.table.add(
        RunningDomain(record=record, paths=layout.machine_paths("vm"), monitor=monitor)
    )
    yield services, peer
    await monitor.close()
    await peer.close()


async def test_pause_and_unpause_send_qmp_and_persist(
    setup: tuple[Services, FakeQmpPeer],
) -> None:
    services, peer = setup
    manager = services.lifecycle
    await manager.pause("vm")
    assert peer.received[-1] == "stop"
    assert services.table.get("vm").record.state is DomainState.PAUSED
    assert load_record(services.table.layout.record_file("vm")).state is DomainState.PAUSED
    await manager.unpause("vm")
    assert peer.received[-1] == "cont"
    assert manager.list_rows()[0]["state"] == "running"


async def test_refused_request_sends_nothing(setup: tuple[Services, FakeQmpPeer]) -> None:
    services, peer = setup
    manager = services.lifecycle
    before = list(peer.received)
    with pytest.raises(InvalidTransition, match="cannot unpause domain 'vm': it is running"):
        await manager.unpause("vm")
    assert peer.received == before


async def test_failed_qmp_command_keeps_the_state(setup: tuple[Services, FakeQmpPeer]) -> None:
    services, peer = setup
    manager = services.lifecycle
    peer.fail["stop"] = "injected failure"
    with pytest.raises(QmpError, match="injected failure"):
        await manager.pause("vm")
    assert services.table.get("vm").record.state is DomainState.RUNNING


async def test_unknown_domain(setup: tuple[Services, FakeQmpPeer]) -> None:
    services, _ = setup
    manager = services.lifecycle
    with pytest.raises(DomainNotFound, match="'nope' does not exist on host testhost"):
        await manager.pause("nope")


async def test_shutdown_of_a_paused_domain_is_refused(
    setup: tuple[Services, FakeQmpPeer],
) -> None:
    services, peer = setup
    manager = services.lifecycle
    await manager.pause("vm")
    with pytest.raises(Exception, match="paused"):
        await manager.shutdown("vm", wait=False, timeout=1)
    assert "system_powerdown" not in peer.received


async def test_out_of_band_stop_is_followed(setup: tuple[Services, FakeQmpPeer]) -> None:
    services, peer = setup
    dom = services.table.get("vm")
    follow = asyncio.create_task(services.watcher.follow_events(dom))
    peer.status = "paused"
    await peer.emit("STOP")
    await wait_until(
        lambda: dom.record.state is DomainState.PAUSED, timeout=5, what="the state to follow"
    )
    follow.cancel()
    assert load_record(services.table.layout.record_file("vm")).state is DomainState.PAUSED


async def test_shutdown_without_a_guest_agent_presses_the_acpi_button(
    setup: tuple[Services, FakeQmpPeer],
) -> None:
    services, peer = setup
    # No qemu-ga behind the channel (here: no socket at all).
    done = await services.lifecycle.shutdown("vm", wait=False, timeout=1)
    assert done == {"ended": False, "method": "the ACPI power button"}
    assert "system_powerdown" in peer.received


async def test_shutdown_goes_through_the_guest_agent_when_it_answers(
    setup: tuple[Services, FakeQmpPeer],
) -> None:
    services, peer = setup
    seen: list[bytes] = []

    async def agent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while line := await reader.readline():
            seen.append(line)
            message = json.loads(line.lstrip(b"\xff"))
            if message["execute"] == "guest-sync-delimited":
                writer.write(b"\xff" + json.dumps({"return": message["arguments"]["id"]}).encode())
                writer.write(b"\n")
            elif message["execute"] == "guest-ping":
                writer.write(b'{"return": {}}\n')
            await writer.drain()

    dom = services.table.get("vm")
    dom.paths.run_dir.mkdir(parents=True, exist_ok=True)
    server = await asyncio.start_unix_server(agent, str(dom.paths.agent_socket))
    async with server:
        done = await services.lifecycle.shutdown("vm", wait=False, timeout=1)
        await wait_until(
            lambda: any(b"guest-shutdown" in s for s in seen), timeout=5, what="guest-shutdown"
        )
    assert done["method"] == "the guest agent"
    assert "system_powerdown" not in peer.received
