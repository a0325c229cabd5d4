"""The lifecycle requests of DomainManager against a fake QMP peer."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from ferry.config.host import HostConfig
from ferry.daemon.layout import HostLayout
from ferry.daemon.manager import DomainManager
from ferry.daemon.record import DomainRecord, load_record
from ferry.daemon.running import RunningDomain
from ferry.domain.config import DomainConfig
from ferry.domain.state import DomainState
from ferry.errors import DomainNotFound, InvalidTransition, QmpError
from ferry.hypervisor.cmdline import BootFiles
from ferry.hypervisor.monitor import Monitor

from .fake_qmp import FakeQmpPeer


@pytest.fixture
async def setup(tmp_path: Path) -> AsyncIterator[tuple[DomainManager, FakeQmpPeer]]:
    layout = HostLayout(tmp_path / "state", tmp_path / "run")
    layout.create()
    host = HostConfig(
        name="testhost", state_dir=layout.state_dir, run_dir=layout.run_dir, accel="tcg"
    )
    manager = DomainManager(host, layout, lambda cfg: BootFiles(Path("/k"), None))
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
    manager.domains["vm"] = RunningDomain(
        record=record, paths=layout.machine_paths("vm"), monitor=monitor
    )
    yield manager, peer
    await monitor.close()
    await peer.close()


async def test_pause_and_unpause_send_qmp_and_persist(
    setup: tuple[DomainManager, FakeQmpPeer],
) -> None:
    manager, peer = setup
    await manager.pause("vm")
    assert peer.received[-1] == "stop"
    assert manager.domains["vm"].record.state is DomainState.PAUSED
    assert load_record(manager.layout.record_file("vm")).state is DomainState.PAUSED
    await manager.unpause("vm")
    assert peer.received[-1] == "cont"
    assert manager.list_rows()[0]["state"] == "running"


async def test_refused_request_sends_nothing(setup: tuple[DomainManager, FakeQmpPeer]) -> None:
    manager, peer = setup
    before = list(peer.received)
    with pytest.raises(InvalidTransition, match="cannot unpause domain 'vm': it is running"):
        await manager.unpause("vm")
    assert peer.received == before


async def test_failed_qmp_command_keeps_the_state(setup: tuple[DomainManager, FakeQmpPeer]) -> None:
    manager, peer = setup
    peer.fail["stop"] = "injected failure"
    with pytest.raises(QmpError, match="injected failure"):
        await manager.pause("vm")
    assert manager.domains["vm"].record.state is DomainState.RUNNING


async def test_unknown_domain(setup: tuple[DomainManager, FakeQmpPeer]) -> None:
    manager, _ = setup
    with pytest.raises(DomainNotFound, match="'nope' does not exist on host testhost"):
        await manager.pause("nope")


async def test_shutdown_of_a_paused_domain_is_refused(
    setup: tuple[DomainManager, FakeQmpPeer],
) -> None:
    manager, peer = setup
    await manager.pause("vm")
    with pytest.raises(Exception, match="paused"):
        await manager.shutdown("vm", wait=False, timeout=1)
    assert "system_powerdown" not in peer.received


async def test_out_of_band_stop_is_followed(setup: tuple[DomainManager, FakeQmpPeer]) -> None:
    manager, peer = setup
    dom = manager.domains["vm"]
    follow = asyncio.create_task(manager._follow_events(dom))
    peer.status = "paused"
    await peer.emit("STOP")
    for _ in range(100):
        if dom.record.state is DomainState.PAUSED:
            break
        await asyncio.sleep(0.01)
    follow.cancel()
    assert dom.record.state is DomainState.PAUSED
