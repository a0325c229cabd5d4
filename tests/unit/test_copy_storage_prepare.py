"""The target's side of --copy-storage, driven by a fake source speaking the protocol.

The target makes the disk, serves it (NBD over TLS, to the source only), and
removes it whenever the migration does not commit: the source gone, ferryd
restarted midway. A disk that is already there is never touched.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from ferry.cluster.ownership import LocalOwnership
from ferry.domain.config import DomainConfig
from ferry.domain.migration_state import Outcome
from ferry.errors import MigrationError, MigrationRefused
from ferry.host import arriving_disks
from ferry.hypervisor.monitor import Monitor
from ferry.migration import incoming as incoming_mod
from ferry.storage import new_disk

from .migration_harness import Cluster, FakeHost, qmp_call, until
from .test_migration_prepare import assert_nothing_left, one_target, open_session, prepare_message

MIB = 1 << 20


@pytest.fixture
async def target(tmp_path: Path) -> AsyncIterator[tuple[Cluster, FakeHost]]:
    async with one_target(tmp_path) as found:
        yield found


def copy_message(c: Cluster, h: FakeHost, path: Path, size: int = 4 * MIB) -> dict[str, Any]:
    message = prepare_message(c, h)
    message["config"]["disk"][0]["path"] = str(path)
    message["params"] = {"copy_storage": True}
    message["disks"] = [{"path": str(path), "size": size, "format": "raw", "allocated": MIB}]
    return message


async def test_the_copy_is_made_served_and_removed_when_the_source_goes(
    target: tuple[Cluster, FakeHost],
) -> None:
    c, h2 = target
    path = c.storage / "local.img"
    channel, reply = await open_session(h2, copy_message(c, h2, path))
    try:
        storage = reply["storage"]
        assert storage["exports"] == {"0": "ferry-disk0"}
        assert isinstance(storage["port"], int) and storage["port"] > 0
        assert path.stat().st_size == 4 * MIB
        (qmp,) = c.qemus().values()
        exports = qmp_call(qmp, "query-block-exports")
        assert [e["node-name"] for e in exports] == ["ferry-disk0"]
        tls = qmp_call(qmp, "x-fake-tls")  # the NBD server's objects are the x509 ones
        assert tls is not None
        arriving = h2.s.table.incoming(message_id(h2))
        assert arriving is not None
        assert [d.path for d in arriving.dom.record.created_disks] == [str(path)]
    finally:
        await channel.close()
    # The source went away before any commit: the copy goes with the arrival.
    await until(lambda: not path.exists(), "the copy to be removed")
    await assert_nothing_left(c, h2)


def message_id(h: FakeHost) -> str:
    (mid,) = h.s.table.incoming_ids()
    return mid


async def test_a_disk_that_exists_is_never_copied_over(target: tuple[Cluster, FakeHost]) -> None:
    c, h2 = target
    path = c.storage / "local.img"
    path.write_bytes(b"the only copy of someone's data")
    with pytest.raises(MigrationRefused, match="exists here already"):
        await open_session(h2, copy_message(c, h2, path))
    assert path.read_bytes() == b"the only copy of someone's data"
    await assert_nothing_left(c, h2)


@pytest.mark.parametrize(
    ("fact", "why"),
    [
        ({"size": None}, "no size to copy"),
        ({"size": 0}, "no size to copy"),
        ({"allocated": -1}, "no size to copy"),
        ({"format": "qcow2"}, "format here and at the source differ"),
        ({"size": 1 << 50, "allocated": 1 << 50}, "MiB free"),
    ],
)
async def test_a_bad_description_of_the_disk_is_refused(
    target: tuple[Cluster, FakeHost], fact: dict[str, Any], why: str
) -> None:
    c, h2 = target
    path = c.storage / "local.img"
    message = copy_message(c, h2, path)
    message["disks"][0].update(fact)
    with pytest.raises(MigrationRefused, match=why):
        await open_session(h2, message)
    assert not path.exists()
    await assert_nothing_left(c, h2)


async def test_a_restart_midway_removes_the_copy(target: tuple[Cluster, FakeHost]) -> None:
    c, h2 = target
    path = c.storage / "local.img"
    channel, _ = await open_session(h2, copy_message(c, h2, path))
    await h2.crash()
    await channel.close()
    assert path.exists()  # a crashed ferryd removes nothing
    await h2.start()
    # Re-attached: never committed, so its QEMU ends and the copy goes.
    await until(lambda: not path.exists(), "the copy to be removed after the restart")
    await assert_nothing_left(c, h2)


async def test_a_copy_needs_tls(tmp_path: Path) -> None:
    async with one_target(tmp_path, secure=False) as (c, h2):
        path = c.storage / "local.img"
        with pytest.raises(MigrationRefused, match="needs TLS"):
            await open_session(h2, copy_message(c, h2, path))
        assert not path.exists()
        await assert_nothing_left(c, h2)


async def test_a_failure_while_making_the_disks_leaves_nothing_behind(
    target: tuple[Cluster, FakeHost], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first disk made, the second refused: the first goes, and so does the record."""
    c, h2 = target
    first, second = c.storage / "a.img", c.storage / "b.img"
    message = copy_message(c, h2, first)
    message["config"]["disk"].append({**message["config"]["disk"][0], "path": str(second),
                                      "target": "xvdb"})  # fmt: skip
    message["disks"].append({**message["disks"][0], "path": str(second)})
    made = arriving_disks.create_image

    async def another_comes_first(path: str, fmt: str, size: int) -> new_disk.MadeDisk:
        if path == str(second):
            second.write_bytes(b"somebody else's, made just now")
        return await made(path, fmt, size)

    monkeypatch.setattr(arriving_disks, "create_image", another_comes_first)
    with pytest.raises(MigrationRefused, match="refusing to overwrite"):
        await open_session(h2, message)
    assert not first.exists()
    assert second.read_bytes() == b"somebody else's, made just now"
    assert h2.s.table.outcomes.get(message["migration_id"]) is Outcome.ABORTED
    await assert_nothing_left(c, h2)


async def test_a_dead_arrival_that_the_store_committed_keeps_its_disks(
    target: tuple[Cluster, FakeHost], monkeypatch: pytest.MonkeyPatch
) -> None:
    """ferryd and the arriving QEMU both died; etcd says the commit went through."""
    c, h2 = target
    path = c.storage / "local.img"
    channel, _ = await open_session(h2, copy_message(c, h2, path))
    mid = message_id(h2)
    await h2.crash()
    await channel.close()
    c.kill_all()
    asked: list[bool] = []

    async def committed(self: Any, ticket: Any, migration_id: str, commit: bool) -> bool:
        asked.append(commit)
        return migration_id == mid

    monkeypatch.setattr(LocalOwnership, "clustered", True)
    monkeypatch.setattr(LocalOwnership, "decide_move", committed)
    await h2.start()
    assert asked == [False]
    assert path.exists(), "the store made the domain this host's: its disk stays"
    assert h2.s.table.outcomes.get(mid) is Outcome.COMMITTED


async def test_an_arrival_dying_while_the_store_decides_keeps_its_disks(
    target: tuple[Cluster, FakeHost],
) -> None:
    """The store may commit it at that very moment: the commit settles the disks, not the end."""
    c, h2 = target
    path = c.storage / "local.img"
    channel, _ = await open_session(h2, copy_message(c, h2, path))
    mid = message_id(h2)
    arriving = h2.s.table.incoming(mid)
    assert arriving is not None
    arriving.deciding = True
    c.kill_all()
    await until(lambda: h2.s.table.incoming(mid) is None, "the dead arrival to be dropped")
    assert path.exists()
    assert h2.s.table.outcomes.get(mid) is Outcome.PENDING
    await channel.close()


async def test_a_launch_cancelled_midway_leaves_no_qemu_and_no_record(
    target: tuple[Cluster, FakeHost], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A prepare cancelled (its source gone, ferryd stopping) while its QEMU starts."""
    c, h2 = target
    launcher = h2.s.launcher
    mapping = c.domain()
    mapping["disk"][0]["format"] = "raw"
    cfg = DomainConfig.from_mapping(mapping, "test")
    record = launcher.new_record(cfg, "tcg", "vm@cancelled", 1)

    async def never(*_args: Any, **_kwargs: Any) -> None:
        await asyncio.Event().wait()

    monkeypatch.setattr(Monitor, "connect", never)
    task = asyncio.create_task(launcher.launch(record, launcher.boot_files(cfg), incoming=True))
    await until(lambda: c.qemus() != {}, "its QEMU to start")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await until(lambda: c.qemus() == {}, "its QEMU to end")
    assert not h2.s.table.layout.record_file(record.key).exists()


async def test_a_check_failing_after_the_launch_ends_the_launched_qemu(
    target: tuple[Cluster, FakeHost], monkeypatch: pytest.MonkeyPatch
) -> None:
    """An unexpected error in the checks that run beside the launch, once it is done."""
    c, h2 = target
    path = c.storage / "local.img"

    async def fails_late(*_args: Any) -> None:
        await until(lambda: c.qemus() != {}, "the arriving QEMU to start")
        await asyncio.sleep(0.5)  # its launch done
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(incoming_mod.IncomingMigrations, "_unlike", fails_late)
    with pytest.raises(MigrationError, match="closed the connection"):
        await open_session(h2, copy_message(c, h2, path))
    await assert_nothing_left(c, h2)
    assert not path.exists()
