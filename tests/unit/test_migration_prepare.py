"""Every check the target makes at prepare, driven by a fake source speaking the protocol.

Each refusal is answered with the reason, and leaves nothing behind: no QEMU,
no arriving domain, no pending outcome.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from ferry.domain.config import DomainConfig
from ferry.errors import MigrationError, MigrationRefused, WaitTimeout
from ferry.hypervisor.seed import seed_digest
from ferry.migration.channel import PROTOCOL_VERSION, Channel
from ferry.storage import lease
from ferry.util.wait import wait_until

from .migration_harness import Cluster, FakeHost, until


@contextlib.asynccontextmanager
async def one_target(
    tmp_path: Path, secure: bool = True
) -> AsyncIterator[tuple[Cluster, FakeHost]]:
    """Host h2 alone, started; crashed at the end, and no fake QEMU outlives the test."""
    c = Cluster(tmp_path, secure=secure)
    h2 = c.hosts[1]
    await h2.start()
    try:
        yield c, h2
    finally:
        try:
            if h2.services is not None:
                await h2.crash()
        finally:
            c.kill_all()


@pytest.fixture
async def target(tmp_path: Path) -> AsyncIterator[tuple[Cluster, FakeHost]]:
    async with one_target(tmp_path) as found:
        yield found


def prepare_message(c: Cluster, h: FakeHost, name: str = "vm", **changes: Any) -> dict[str, Any]:
    config = c.domain(name)
    config["disk"][0]["format"] = "raw"  # as the source pinned it at create
    disk = config["disk"][0]["path"]
    held = lease.acquire(disk, "h1", "vm")
    kernel = h.boot.kernel
    message = {
        "type": "prepare",
        "migration_id": uuid.uuid4().hex,
        "config": config,
        "params": {},
        "disks": [{"path": disk, "size": Path(disk).stat().st_size, "lease_token": held.token}],
        "boot": {"kernel_sha256": hashlib.sha256(kernel.read_bytes()).hexdigest()},
    }
    message.update(changes)
    return message


async def open_session(h: FakeHost, message: dict[str, Any]) -> tuple[Channel, dict[str, Any]]:
    channel = await Channel.connect("127.0.0.1", h.port, 5, h.credentials)
    try:
        await channel.send({"type": "hello", "version": PROTOCOL_VERSION, "host": "h1"})
        await channel.recv(5, "hello")
        await channel.send(message)
        return channel, await channel.recv(30, "prepared")
    except BaseException:
        await channel.close()
        raise


async def prepare(h: FakeHost, message: dict[str, Any]) -> dict[str, Any]:
    channel, reply = await open_session(h, message)
    await channel.close()
    return reply


async def assert_nothing_left(c: Cluster, h: FakeHost) -> None:
    # A session that saw its source go may still be ending its QEMU.
    with contextlib.suppress(WaitTimeout):
        await until(
            lambda: c.qemus() == {} and h.s.table.outcomes.pending() == [] and not records(h),
            "no QEMU, no pending outcome and no record",
            timeout=10,
        )
    assert c.qemus() == {}
    assert h.s.table.everyone() == []
    assert h.s.table.outcomes.pending() == []
    # A record left behind would be acted on by the next ferryd's re-attach.
    assert records(h) == []


def records(h: FakeHost) -> list[Path]:
    return list(h.s.table.layout.domains_dir.glob("*/record.json"))


async def test_a_valid_prepare_starts_a_paused_qemu(target: tuple[Cluster, FakeHost]) -> None:
    c, h = target
    reply = await prepare(h, prepare_message(c, h))
    assert len(reply["token"]) == 32
    # The source went away without a commit: the target drops its copy.
    await h.s.incoming.close()
    await assert_nothing_left(c, h)


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"migration_id": "../../x" + "0" * 30}, "migration id"),
        ({"boot": {"kernel_sha256": "0" * 64}}, "no kernel identical to the source's"),
        ({"boot": {}}, "no kernel identical to the source's"),
        ({"disks": []}, "different number of disks"),
        ({"disks": "size"}, "'disks' a list"),
    ],
    ids=["bad-id", "kernel", "no-kernel-digest", "disk-count", "disk-malformed"],
)
async def test_refusals(
    target: tuple[Cluster, FakeHost], change: dict[str, Any], reason: str
) -> None:
    c, h = target
    with pytest.raises(MigrationRefused, match=reason):
        await prepare(h, prepare_message(c, h, **change))
    await assert_nothing_left(c, h)


async def test_a_cloud_init_seed_must_be_the_sources(target: tuple[Cluster, FakeHost]) -> None:
    c, h = target
    message = prepare_message(c, h)
    message["config"]["cloud_init"] = {"hostname": "web1"}
    seed = DomainConfig.from_mapping(message["config"]).seed_files()
    assert seed is not None
    message["boot"]["seed_sha256"] = seed_digest(dict(seed, **{"meta-data": b"{}"}))
    with pytest.raises(MigrationRefused, match="seed made here differs from the source's"):
        await prepare(h, message)
    await assert_nothing_left(c, h)
    message = prepare_message(c, h)
    message["config"]["cloud_init"] = {"hostname": "web1"}
    message["boot"]["seed_sha256"] = seed_digest(seed)
    assert len((await prepare(h, message))["token"]) == 32
    await h.s.incoming.close()
    await assert_nothing_left(c, h)


async def test_a_format_other_than_the_sources_is_refused(
    target: tuple[Cluster, FakeHost],
) -> None:
    c, h = target
    message = prepare_message(c, h)
    message["disks"][0]["format"] = "qcow2"
    with pytest.raises(MigrationRefused, match="raw image here but qcow2 on the source"):
        await prepare(h, message)
    message = prepare_message(c, h)
    message["config"]["disk"][0]["format"] = "qcow2"
    with pytest.raises(MigrationRefused, match="is a raw image, not qcow2"):
        await prepare(h, message)
    await assert_nothing_left(c, h)


async def test_disk_of_another_size_is_refused(target: tuple[Cluster, FakeHost]) -> None:
    c, h = target
    message = prepare_message(c, h)
    message["disks"][0]["size"] += 512
    with pytest.raises(MigrationRefused, match="not the same image"):
        await prepare(h, message)
    await assert_nothing_left(c, h)


@pytest.mark.parametrize("token", ["f" * 32, None], ids=["other", "none"])
async def test_disk_without_the_sources_lease_is_refused(
    target: tuple[Cluster, FakeHost], token: str | None
) -> None:
    c, h = target
    message = prepare_message(c, h)
    message["disks"][0]["lease_token"] = token
    with pytest.raises(MigrationRefused, match="lease differs"):
        await prepare(h, message)
    await assert_nothing_left(c, h)


async def test_too_much_memory_is_refused(target: tuple[Cluster, FakeHost]) -> None:
    c, h = target
    message = prepare_message(c, h)
    message["config"]["memory"] = 1 << 30
    with pytest.raises(MigrationRefused, match="memory"):
        await prepare(h, message)
    await assert_nothing_left(c, h)


async def test_a_name_already_running_is_refused(target: tuple[Cluster, FakeHost]) -> None:
    c, h = target
    local = c.domain("other")
    local["name"] = "vm"
    await h.s.lifecycle.create(local)
    message = prepare_message(c, h)
    with pytest.raises(MigrationRefused, match="already runs"):
        await prepare(h, message)
    assert len(c.qemus()) == 1


async def test_a_migration_id_is_used_once(target: tuple[Cluster, FakeHost]) -> None:
    c, h = target
    message = prepare_message(c, h)
    await prepare(h, message)
    await h.s.incoming.close()
    with pytest.raises(MigrationRefused, match="seen before"):
        await prepare(h, message)
    await assert_nothing_left(c, h)


async def test_the_data_connection_needs_the_token(target: tuple[Cluster, FakeHost]) -> None:
    c, h = target
    message = prepare_message(c, h)
    session, reply = await open_session(h, message)
    for token in ("0" * 32, reply["token"] + "0"):
        reader, writer = await asyncio.open_connection("127.0.0.1", h.port)
        header = {"type": "data", "migration_id": message["migration_id"], "token": token}
        writer.write(json.dumps(header).encode() + b"\n")
        answer = (await asyncio.wait_for(reader.readline(), 5)).decode()
        writer.close()
        assert answer.startswith("refused: no migration of that id and token"), answer
    arriving = h.s.table.incoming(message["migration_id"])
    assert arriving is not None and not arriving.streaming
    await session.close()
    await h.s.incoming.close()
    await assert_nothing_left(c, h)


@pytest.mark.parametrize("where", ["elsewhere", "missing"])
async def test_boot_files_only_from_the_image_directory(
    target: tuple[Cluster, FakeHost], where: str
) -> None:
    """A kernel the source names outside the image directory, with its very digest,
    is refused, with the same answer as a missing one: no probing of this host's files."""
    c, h = target
    outside = c.tmp.parent / f"{c.tmp.name}-outside"
    outside.mkdir()
    secret = outside / "secret"
    secret.write_bytes(b"not a kernel")
    path = secret if where == "elsewhere" else outside / "missing"
    message = prepare_message(c, h)
    message["config"]["kernel"] = str(path)
    message["boot"] = {"kernel_sha256": hashlib.sha256(b"not a kernel").hexdigest()}
    with pytest.raises(MigrationRefused) as refused:
        await prepare(h, message)
    assert str(refused.value).endswith(
        "this host's image directory has no kernel identical to the source's"
    )
    await assert_nothing_left(c, h)


async def test_an_initrd_needs_its_digest(target: tuple[Cluster, FakeHost]) -> None:
    c, h = target
    initrd = h.boot.kernel.parent / "initrd.img"
    initrd.write_bytes(b"initrd")
    message = prepare_message(c, h)
    message["config"]["kernel"] = str(h.boot.kernel)
    message["config"]["ramdisk"] = str(initrd)
    with pytest.raises(MigrationRefused, match="no initrd identical to the source's"):
        await prepare(h, message)
    await assert_nothing_left(c, h)


async def test_connections_are_bounded_per_peer(
    target: tuple[Cluster, FakeHost], caplog: pytest.LogCaptureFixture
) -> None:
    """A peer holding many idle connections is closed on, and keeps no more resources."""
    from ferry.daemon import relocation

    _c, h = target
    idle = [
        await asyncio.open_connection("127.0.0.1", h.port) for _ in range(relocation.MAX_PER_PEER)
    ]
    for _ in range(5):
        reader, writer = await asyncio.open_connection("127.0.0.1", h.port)
        # Closed at once, unanswered: before its first byte nobody knows whether
        # a peer speaks TLS, so there is no protocol to answer it in.
        assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()
    # Said once, not once per connection: a flood must not flood the log.
    refusals = [r for r in caplog.records if "too many" in r.getMessage()]
    assert len(refusals) == 1, [r.getMessage() for r in refusals]
    for _, w in idle:
        w.close()

    # Once they are gone, the peer is served again.
    async def served() -> bool:
        try:
            channel = await Channel.connect("127.0.0.1", h.port, 5, h.credentials)
        except MigrationError:  # closed on: still too many
            return False
        try:
            await channel.send({"type": "status", "migration_id": "0" * 32})
            return (await channel.recv(5, "status"))["outcome"] == "unknown"
        except MigrationRefused:
            return False
        finally:
            await channel.close()

    await wait_until(served, timeout=10, what="the peer to be served again")


def free_mib() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) // 1024
    raise AssertionError("no MemAvailable")


async def test_memory_promised_to_arriving_domains_counts(
    target: tuple[Cluster, FakeHost],
) -> None:
    """Two arrivals that each fit alone, but not together: the second is refused."""
    c, h = target
    each = int(free_mib() * 0.6)
    first = prepare_message(c, h, "vm1")
    first["config"]["memory"] = each
    session, _ = await open_session(h, first)
    second = prepare_message(c, h, "vm2")
    second["config"]["memory"] = each
    with pytest.raises(MigrationRefused, match="promised to its domains"):
        await prepare(h, second)
    assert len(c.qemus()) == 1
    await session.close()
    await h.s.incoming.close()
    await assert_nothing_left(c, h)


async def test_arrivals_at_once_are_bounded(
    target: tuple[Cluster, FakeHost], monkeypatch: pytest.MonkeyPatch
) -> None:
    from ferry.migration import incoming

    monkeypatch.setattr(incoming, "MAX_PENDING", 1)
    c, h = target
    session, _ = await open_session(h, prepare_message(c, h, "vm1"))
    with pytest.raises(MigrationRefused, match="1 migrations are arriving already"):
        await prepare(h, prepare_message(c, h, "vm2"))
    await session.close()
    await h.s.incoming.close()
    await assert_nothing_left(c, h)
