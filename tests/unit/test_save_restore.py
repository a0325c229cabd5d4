"""`ferry save` and `ferry restore` between two in-process hosts, with fake QEMUs that write
and read the file through the descriptor ferryd gives them.

Each test asks the QEMU processes themselves what runs where, and the file
system what is left.
"""

from __future__ import annotations

import asyncio
import stat
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from ferry.domain.state import DomainState
from ferry.errors import DomainExists, StorageError
from ferry.storage import lease
from ferry.storage.save_file import STREAM_OFFSET, SaveHeader

from .migration_harness import Cluster, qmp_call, running, until


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    async with running(Cluster(tmp_path)) as c:
        await c.hosts[0].s.lifecycle.create(c.domain())
        yield c


def ram_of(c: Cluster) -> str:
    ((_pid, qmp),) = c.qemus().items()
    return str(qmp_call(qmp, "x-fake-ram")["sha256"])


async def test_save_ends_the_domain_and_restore_runs_it_elsewhere(
    cluster: Cluster, tmp_path: Path
) -> None:
    h1, h2 = cluster.hosts
    await h1.s.lifecycle.pause("vm")  # its memory stands still: compare it after
    ram = await asyncio.to_thread(ram_of, cluster)
    path = tmp_path / "vm.save"
    saved = await h1.s.save_restore.save("vm", str(path))
    assert saved["bytes"] > 0 and path.stat().st_size == STREAM_OFFSET + saved["bytes"]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600  # it holds the guest's memory
    header = SaveHeader.decode(path.read_bytes()[:STREAM_OFFSET], str(path))
    assert header.config["name"] == "vm" and header.running is False and header.host == "h1"
    await until(lambda: not cluster.qemus(), "the saved domain's QEMU to end")
    assert h1.s.table.find("vm") is None
    assert lease.read_lease(str(cluster.storage / "vm.img")) is None  # free for another host

    restored = await h2.s.save_restore.restore(str(path))
    assert restored["name"] == "vm" and restored["running"] is False
    await cluster.assert_runs_once("h2", running=False)
    assert h2.s.table.get("vm").record.state is DomainState.PAUSED
    assert await asyncio.to_thread(ram_of, cluster) == ram
    await h2.s.lifecycle.unpause("vm")
    await cluster.assert_runs_once("h2")


async def test_a_running_domain_comes_back_running(cluster: Cluster, tmp_path: Path) -> None:
    h1 = cluster.hosts[0]
    await h1.s.save_restore.save("vm", str(tmp_path / "vm.save"))
    result = await h1.s.save_restore.restore(str(tmp_path / "vm.save"))
    assert result["running"] is True
    await cluster.assert_runs_once("h1")
    assert h1.s.table.get("vm").record.state is DomainState.RUNNING


async def test_save_never_overwrites_a_file(cluster: Cluster, tmp_path: Path) -> None:
    path = tmp_path / "precious"
    path.write_text("keep me")
    with pytest.raises(StorageError, match="exists already"):
        await cluster.hosts[0].s.save_restore.save("vm", str(path))
    assert path.read_text() == "keep me"
    await cluster.assert_runs_once("h1")


async def test_a_save_that_fails_midway_keeps_the_domain_running(
    cluster: Cluster, tmp_path: Path
) -> None:
    h1 = cluster.hosts[0]
    cluster.plan(source={"hold_at": 64 * 1024})
    path = tmp_path / "vm.save"
    task = asyncio.create_task(h1.s.save_restore.save("vm", str(path)))
    ((_pid, qmp),) = cluster.qemus().items()
    await until(lambda: qmp_call(qmp, "query-migrate").get("status") == "active", "the save")
    await asyncio.to_thread(qmp_call, qmp, "migrate_cancel")  # as if the disk had failed
    with pytest.raises(StorageError, match="failed in QEMU"):
        await task
    assert not path.exists()
    await cluster.assert_runs_once("h1")
    assert h1.s.table.get("vm").record.state is DomainState.RUNNING


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("flip", "is corrupt"),
        ("cut", "is corrupt"),
        ("foreign", "is not a ferry save file"),
        ("header", "its header is damaged"),
    ],
)
async def test_a_corrupt_or_foreign_file_is_refused_and_nothing_starts(
    cluster: Cluster, tmp_path: Path, damage: str, message: str
) -> None:
    h1, h2 = cluster.hosts
    path = tmp_path / "vm.save"
    await h1.s.save_restore.save("vm", str(path))
    await until(lambda: not cluster.qemus(), "the saved domain's QEMU to end")
    data = bytearray(path.read_bytes())
    if damage == "flip":
        data[STREAM_OFFSET + 100] ^= 0xFF
    elif damage == "cut":
        data = data[:-10]
    elif damage == "foreign":
        data = bytearray(b"#!/bin/sh\necho not a save\n")
    else:
        data[20] = ord("}")
    path.write_bytes(bytes(data))
    with pytest.raises(StorageError, match=message):
        await h2.s.save_restore.restore(str(path))
    assert not cluster.qemus() and h2.s.table.find("vm") is None
    assert lease.read_lease(str(cluster.storage / "vm.img")) is None


async def test_a_disk_that_changed_since_the_save_is_refused(
    cluster: Cluster, tmp_path: Path
) -> None:
    h1, h2 = cluster.hosts
    path = tmp_path / "vm.save"
    await h1.s.save_restore.save("vm", str(path))
    with (cluster.storage / "vm.img").open("ab") as disk:
        disk.write(b"\0" * 4096)  # grown: not the disk the memory was saved with
    with pytest.raises(StorageError, match="not the one saved with the domain"):
        await h2.s.save_restore.restore(str(path))
    assert not cluster.qemus()


async def test_a_restore_of_a_domain_that_runs_is_refused(cluster: Cluster, tmp_path: Path) -> None:
    h1 = cluster.hosts[0]
    path = tmp_path / "vm.save"
    await h1.s.save_restore.save("vm", str(path))
    await h1.s.save_restore.restore(str(path))
    with pytest.raises(DomainExists):
        await h1.s.save_restore.restore(str(path))
    await cluster.assert_runs_once("h1")
