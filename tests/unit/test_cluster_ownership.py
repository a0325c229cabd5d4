"""Ownership of domains and disks in a real etcd: taken, refused, moved, settled, expired."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from ferry.cluster.etcd import EtcdClient, parse_endpoints
from ferry.cluster.keys import Keys, disk_id
from ferry.cluster.lease import HostLease, LeaseState
from ferry.cluster.ownership import EtcdOwnership
from ferry.errors import ClusterError, ClusterUnavailable, OwnedElsewhere
from ferry.util.wait import wait_until

from .etcd_support import EtcdMember

KEYS = Keys("test")
DISK = "nfs://10.0.0.3/export/virt_server.img"


class Host:
    def __init__(self, name: str, member: EtcdMember, tmp: Path, ttl: int = 4) -> None:
        self.etcd = EtcdClient(parse_endpoints([member.url], "test"), None, timeout=1.0)
        self.lease = HostLease(self.etcd, ttl, tmp / f"{name}.lease")
        self.own = EtcdOwnership(self.etcd, KEYS, name, self.lease)

    async def close(self) -> None:
        await self.lease.close()
        await self.etcd.close()


@pytest.fixture
async def hosts(etcd: EtcdMember, tmp_path: Path) -> AsyncIterator[tuple[Host, Host]]:
    a, b = Host("xen_host_1", etcd, tmp_path), Host("xen_host_2", etcd, tmp_path)
    for h in (a, b):
        await h.lease.acquire()
        h.lease.start()
    try:
        yield a, b
    finally:
        await a.close()
        await b.close()


async def test_a_domain_running_on_one_host_cannot_start_on_another(
    hosts: tuple[Host, Host],
) -> None:
    a, b = hosts
    await a.own.take("virt_server", [DISK])
    # A take retried after its answer was lost finds it applied: not an error.
    await a.own.take("virt_server", [DISK])
    with pytest.raises(OwnedElsewhere, match="already runs on host xen_host_1"):
        await b.own.take("virt_server", [DISK])
    owner = await b.own.owner("virt_server")
    assert owner is not None and owner.host == "xen_host_1"


async def test_a_disk_in_use_refuses_another_domain_however_its_url_is_spelled(
    hosts: tuple[Host, Host],
) -> None:
    a, b = hosts
    await a.own.take("virt_server", ["nbd://Store/disk"])
    with pytest.raises(OwnedElsewhere, match="in use by domain 'virt_server' on host xen_host_1"):
        await b.own.take("other", ["nbd://store:10809/disk"])
    # All or nothing: the refused take left no key of its own behind.
    assert await b.own.owner("other") is None
    assert disk_id("NBD://Store:10809/disk") == disk_id("nbd://store/disk")


async def test_release_frees_domain_and_disks(hosts: tuple[Host, Host]) -> None:
    a, b = hosts
    await a.own.take("virt_server", [DISK])
    await b.own.release("virt_server", [DISK])  # not b's: changes nothing
    assert (await a.own.owner("virt_server")) is not None
    await a.own.release("virt_server", [DISK])
    await b.own.take("virt_server", [DISK])


async def test_a_dead_hosts_lease_expires_and_frees_what_it_owned(hosts: tuple[Host, Host]) -> None:
    a, b = hosts
    await a.own.take("virt_server", [DISK])
    await a.lease.close()  # a stops renewing, as a dead host would

    async def freed() -> bool:
        return await b.etcd.get(KEYS.domain("virt_server")) is None

    await wait_until(freed, timeout=10, what="a's lease to expire")
    await b.own.take("virt_server", [DISK])


async def test_migration_commit_moves_domain_and_disks_once(hosts: tuple[Host, Host]) -> None:
    a, b = hosts
    await a.own.take("virt_server", [DISK])
    ticket = await b.own.expect_move("virt_server", "xen_host_1", [DISK])
    assert await b.own.decide_move(ticket, "m1", commit=True)
    # A retry after a lost answer reads who won: still committed, and a late
    # abort cannot undo it.
    assert await b.own.decide_move(ticket, "m1", commit=True)
    assert await b.own.decide_move(ticket, "m1", commit=False)
    owner = await a.own.owner("virt_server")
    assert owner is not None and (owner.host, owner.migration) == ("xen_host_2", "m1")
    disk = await a.etcd.get(KEYS.disk(DISK))
    assert disk is not None and disk.lease == b.lease.id
    assert await a.own.settle_move("virt_server", "m1") == "committed"


async def test_a_source_in_doubt_aborts_in_etcd_and_the_target_can_no_longer_commit(
    hosts: tuple[Host, Host],
) -> None:
    a, b = hosts
    await a.own.take("virt_server", [DISK])
    ticket = await b.own.expect_move("virt_server", "xen_host_1", [DISK])
    assert await a.own.settle_move("virt_server", "m1") == "aborted"
    assert not await b.own.decide_move(ticket, "m1", commit=True)
    owner = await b.own.owner("virt_server")
    assert owner is not None and owner.host == "xen_host_1"


async def test_a_target_that_aborts_in_etcd_makes_a_late_commit_fail(
    hosts: tuple[Host, Host],
) -> None:
    a, b = hosts
    await a.own.take("virt_server", [DISK])
    ticket = await b.own.expect_move("virt_server", "xen_host_1", [DISK])
    assert not await b.own.decide_move(ticket, "m1", commit=False)
    assert not await b.own.decide_move(ticket, "m1", commit=True)
    owner = await a.own.owner("virt_server")
    assert owner is not None and owner.host == "xen_host_1"
    # The source's own lease still holds the key: a's death still frees it.
    entry = await a.etcd.get(KEYS.domain("virt_server"))
    assert entry is not None and entry.lease == a.lease.id


async def test_the_target_refuses_a_domain_the_source_does_not_own(
    hosts: tuple[Host, Host],
) -> None:
    _a, b = hosts
    with pytest.raises(OwnedElsewhere, match="not owned by xen_host_1"):
        await b.own.expect_move("virt_server", "xen_host_1", [DISK])
    await b.own.take("virt_server", [DISK])
    with pytest.raises(OwnedElsewhere, match="owned by host xen_host_2, not by xen_host_1"):
        await b.own.expect_move("virt_server", "xen_host_1", [DISK])


async def test_lease_goes_late_then_lost_without_quorum_and_nothing_new_is_taken(
    etcd: EtcdMember,
    tmp_path: Path,
) -> None:
    host = Host("xen_host_1", etcd, tmp_path, ttl=3)
    await host.lease.acquire()
    seen: list[LeaseState] = []
    host.lease.on_change(lambda old, new: seen.append(new))
    host.lease.start()
    etcd.freeze()
    try:
        await wait_until(lambda: host.lease.state is LeaseState.LOST, timeout=10,
                         what="the lease to be lost")  # fmt: skip
        assert seen == [LeaseState.LATE, LeaseState.EXPIRING, LeaseState.LOST]
        with pytest.raises(ClusterError, match="holds no valid etcd lease"):
            await host.own.take("virt_server", [DISK])
        with pytest.raises(ClusterUnavailable, match="no etcd member answered"):
            await host.etcd.get(KEYS.domain("virt_server"))
    finally:
        etcd.thaw()
        await host.close()


async def test_a_restarted_daemon_takes_up_its_live_lease(etcd: EtcdMember, tmp_path: Path) -> None:
    first = Host("xen_host_1", etcd, tmp_path)
    await first.lease.acquire()
    await first.own.take("virt_server", [DISK])
    await first.close()
    again = Host("xen_host_1", etcd, tmp_path)
    try:
        await again.lease.acquire()
        assert again.lease.id == first.lease.id
        owner = await again.own.owner("virt_server")
        assert owner is not None and owner.host == "xen_host_1"
    finally:
        await again.close()


async def test_keys_under_an_old_lease_are_rebound_to_the_new_one(
    etcd: EtcdMember, tmp_path: Path
) -> None:
    """A host whose lease changed while its domain ran: the keys must not expire with the
    old lease (another host could then start the domain)."""
    old = Host("xen_host_1", etcd, tmp_path / "old")
    await old.lease.acquire()
    await old.own.take("virt_server", [DISK])
    new = Host("xen_host_1", etcd, tmp_path / "new")
    await new.lease.acquire()
    try:
        owner = await new.own.owner("virt_server")
        assert owner is not None and owner.lease == old.lease.id != new.lease.id
        assert await new.own.rebind("virt_server", [DISK])
        await old.etcd.revoke(old.lease.id)  # the old lease ends
        owner = await new.own.owner("virt_server")
        assert owner is not None and owner.lease == new.lease.id
        disk = await new.etcd.get(KEYS.disk(DISK))
        assert disk is not None and disk.lease == new.lease.id
    finally:
        await old.close()
        await new.close()
