"""Two hosts, a real etcd (TLS, the cluster CA's certificates) and each host's real fencer process.

The issue's repro first: a domain running on one host cannot be created on the
other. Then ownership through a migration, the whole cluster in one list, and
fencing: a host cut from etcd stops its QEMUs before its lease can expire,
and ends them once it has.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from ferry.cluster.etcd import EtcdClient, Put, parse_endpoints
from ferry.cluster.keys import Keys, decode
from ferry.cluster.lease import LeaseState
from ferry.daemon.evacuation import Evacuation
from ferry.daemon.metrics import register_state
from ferry.domain.state import DomainState
from ferry.errors import ClusterError, MigrationInDoubt, MigrationRefused, OwnedElsewhere
from ferry.hypervisor import process
from ferry.migration import source as source_mod
from ferry.migration.params import MigrationParams
from ferry.migration.target import Prepared
from ferry.pki.identity import Role
from ferry.util.metrics import Metrics
from ferry.util.wait import wait_until

from .etcd_support import EtcdMember
from .metrics_support import scrape, value
from .migration_harness import Cluster, FakeHost, running, until
from .pki_support import TestCA
from .test_migration_protocol import drop_message


def etcd_for(tmp: Path, ca: TestCA) -> EtcdMember:
    return EtcdMember(tmp / "etcd", tls=ca.credentials("etcd").dir)


@contextlib.asynccontextmanager
async def etcd_cluster(tmp: Path, lease_ttl: int = 4) -> AsyncIterator[tuple[Cluster, EtcdMember]]:
    """Two started hosts on one etcd member (TLS), their certificates of one CA."""
    ca = TestCA(tmp / "etcd-pki")
    c = Cluster(tmp, etcd=["https://127.0.0.1:1"], lease_ttl=lease_ttl)  # the URL once etcd runs
    c.ca = ca
    for host in c.hosts:
        host.credentials = ca.credentials(host.name)
    member = etcd_for(tmp, ca)
    member.enable_auth(ca.credentials("root", Role.VIEWER).dir, [h.name for h in c.hosts])
    c.use_etcd(member.url)
    try:
        async with running(c) as started:
            yield started, member
    finally:
        member.stop()


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[tuple[Cluster, EtcdMember]]:
    async with etcd_cluster(tmp_path) as started:
        yield started


async def owner(h: FakeHost, name: str = "vm") -> dict[str, object] | None:
    assert h.member is not None
    entry = await h.member.etcd.get(Keys("ferry").domain(name))
    return decode(entry.value, entry.key) if entry else None


def qemu_state(pid: int) -> str | None:
    return process.process_state(pid)


async def test_a_saved_domain_is_nobodys_until_restored_then_the_restorers(
    cluster: tuple[Cluster, EtcdMember], tmp_path: Path
) -> None:
    c, _ = cluster
    h1, h2 = c.hosts
    await h1.s.lifecycle.create(c.domain())
    path = str(tmp_path / "vm.save")
    await h1.s.save_restore.save("vm", path)
    await until(lambda: not c.qemus(), "the saved domain's QEMU to end")
    assert await owner(h1) is None  # freed with the domain: any host may restore it
    await h2.s.save_restore.restore(path)
    assert (await owner(h1) or {}).get("host") == "h2"
    # It runs on h2 now: h1 may neither restore nor create it.
    with pytest.raises(OwnedElsewhere, match="already runs on host h2"):
        await h1.s.save_restore.restore(path)
    await c.assert_runs_once("h2")


async def test_a_domain_running_on_one_host_cannot_be_created_on_the_other(
    cluster: tuple[Cluster, EtcdMember],
) -> None:
    c, _ = cluster
    h1, h2 = c.hosts
    await h1.s.lifecycle.create(c.domain())
    with pytest.raises(
        OwnedElsewhere, match="cannot create domain 'vm': domain 'vm' already runs on host h1"
    ):
        await h2.s.lifecycle.create(c.domain())
    assert h2.s.table.find("vm") is None
    await c.assert_runs_once("h1")


async def test_a_disk_in_use_cannot_be_written_by_another_domain_elsewhere(
    cluster: tuple[Cluster, EtcdMember],
) -> None:
    c, _ = cluster
    h1, h2 = c.hosts
    await h1.s.lifecycle.create(c.domain())
    other = c.domain("other")
    other["disk"] = c.domain()["disk"]
    with pytest.raises(OwnedElsewhere, match="in use by domain 'vm' on host h1"):
        await h2.s.lifecycle.create(other)
    assert await owner(h1, "other") is None


async def test_migration_moves_ownership_in_the_commit(cluster: tuple[Cluster, EtcdMember]) -> None:
    c, _ = cluster
    h1, h2 = c.hosts
    await h1.s.lifecycle.create(c.domain())
    result = await h1.migrate("vm", h2)
    await c.assert_runs_once("h2")
    held = await owner(h1)
    assert held is not None and held["host"] == "h2"
    assert held["migration"] == result["migration_id"]
    with pytest.raises(OwnedElsewhere, match="already runs on host h2"):
        await h1.s.lifecycle.create(c.domain())
    # Destroyed, the domain is free for any host again.
    await h2.s.lifecycle.destroy("vm")
    await until(lambda: h2.s.table.find("vm") is None, "the domain to end")
    assert await owner(h1) is None
    await h1.s.lifecycle.create(c.domain())


async def test_the_whole_cluster_in_one_list(cluster: tuple[Cluster, EtcdMember]) -> None:
    c, _ = cluster
    h1, h2 = c.hosts
    await h1.s.lifecycle.create(c.domain())
    await h2.s.lifecycle.create(c.domain("web"))

    async def listed() -> list[dict[str, object]] | None:
        rows = await h2.s.cluster_domains()
        states = {(r["host"], r["name"]): r["state"] for r in rows}
        ok = states == {("h1", "vm"): "running", ("h2", "web"): "running"}
        return rows if ok else None

    await wait_until(listed, timeout=15, what="both domains in h2's cluster list")
    hosts = await h1.s.cluster_hosts()
    assert [h["host"] for h in hosts] == ["h1", "h2"]
    for row in hosts:
        assert row["health"] == "up" and row["domains"] == 1
        assert 0 < int(row["lease_ttl_left"]) <= c.etcd.lease_ttl  # type: ignore[call-overload]


async def test_a_host_cut_from_etcd_stops_its_vms_before_its_lease_expires_then_ends_them(
    cluster: tuple[Cluster, EtcdMember],
) -> None:
    c, member = cluster
    h1, h2 = c.hosts
    await h1.s.lifecycle.create(c.domain())
    pid = h1.s.table.get("vm").pid
    assert h1.member is not None
    ttl = c.etcd.lease_ttl
    member.freeze()
    frozen = time.monotonic()
    try:
        await until(lambda: qemu_state(pid) == "T", "the fencer to stop the QEMU", timeout=ttl)
        stopped = time.monotonic() - frozen
        assert stopped < ttl, f"stopped {stopped:.2f} s after etcd froze (TTL {ttl} s)"
        await until(
            lambda: not process.is_alive(pid), "the fencer to end the QEMU", timeout=ttl + 2
        )
    finally:
        member.thaw()
    # The lease expired in etcd too: the domain is free, and the other host takes it.
    await until(lambda: h1.member is not None and h1.member.lease.state is LeaseState.HELD,
                "h1 to hold a new lease", timeout=3 * ttl)  # fmt: skip
    # Prometheus sees it: what fencing did, and renewals both ways.
    metrics = Metrics()
    register_state(metrics, "h1", h1.s.table, h1.member.lease)
    text = await scrape(metrics)
    for event in ("stopped", "killed"):
        assert value(text, "ferry_fencing_events_total", event=event) >= 1, text
    assert value(text, "ferry_lease_renewals_total", result="failed") >= 1, text
    assert value(text, "ferry_lease_state", state="held") == 1

    async def renewed() -> bool:
        return value(await scrape(metrics), "ferry_lease_renewals_total", result="ok") >= 1

    await wait_until(renewed, timeout=2 * ttl, what="a renewal of the new lease counted")

    async def freed() -> bool:
        return await owner(h2) is None

    await wait_until(freed, timeout=2 * ttl, what="the domain's key to expire")
    await h2.s.lifecycle.create(c.domain())
    await c.assert_runs_once("h2")


async def test_a_host_that_renews_in_time_runs_its_vms_again(
    tmp_path: Path,
) -> None:
    async with etcd_cluster(tmp_path, lease_ttl=8) as (c, member):
        h1 = c.hosts[0]
        await h1.s.lifecycle.create(c.domain())
        pid = h1.s.table.get("vm").pid
        member.freeze()
        try:
            await until(lambda: qemu_state(pid) == "T", "the QEMU to be stopped", timeout=8)
        finally:
            member.thaw()
        await until(lambda: qemu_state(pid) in ("S", "R"), "the QEMU to run again", timeout=4)
        await c.assert_runs_once("h1")
        held = await owner(h1)
        assert held is not None and held["host"] == "h1"


async def test_a_crashed_ferryd_leaves_the_lease_and_the_domain_owned(
    cluster: tuple[Cluster, EtcdMember],
) -> None:
    c, _ = cluster
    h1, h2 = c.hosts
    await h1.s.lifecycle.create(c.domain())
    await h1.crash()
    # Longer than the TTL: the fencer, not ferryd, keeps the lease alive.
    assert h1.member is not None
    lease = h1.member.lease.id
    deadline = time.monotonic() + c.etcd.lease_ttl + 1
    while time.monotonic() < deadline:
        with pytest.raises(OwnedElsewhere, match="already runs on host h1"):
            await h2.s.lifecycle.create(c.domain())
        await asyncio.sleep(0.5)  # sampling the refusal over the window
    await h1.start()
    assert h1.member.lease.id == lease
    await c.assert_runs_once("h1")


async def test_etcd_takes_writes_from_the_hosts_only(cluster: tuple[Cluster, EtcdMember]) -> None:
    """An operator's certificate of the same CA reaches etcd but may not touch it."""
    c, member = cluster
    assert c.ca is not None
    operator = c.ca.credentials("client_1", Role.ADMIN)
    etcd = EtcdClient(parse_endpoints([member.url], "test"), operator, timeout=2.0)
    try:
        with pytest.raises(ClusterError, match="permission denied"):
            await etcd.txn([], [Put(Keys("ferry").domain("vm"), b"{}")])
        with pytest.raises(ClusterError, match="permission denied"):
            await etcd.get(Keys("ferry").domain("vm"))
    finally:
        await etcd.close()


# -- evacuation --------------------------------------------------------------------


async def test_evacuation_empties_the_host_and_keeps_new_domains_away(
    cluster: tuple[Cluster, EtcdMember],
) -> None:
    c, _ = cluster
    h1, h2 = c.hosts
    for name in ("vm", "web", "db"):
        await h1.s.lifecycle.create(c.domain(name))
    events: list[dict[str, object]] = []
    result = await Evacuation(h1.s).run(
        [], 2, MigrationParams.from_wire({"live": True, "channels": 1}), events.append
    )
    assert sorted(m["domain"] for m in result["moved"]) == ["db", "vm", "web"]
    assert result["failed"] == [] and result["left"] == []
    assert events[0] == {"event": "maintenance", "host": "h1"}
    assert {e["domain"] for e in events if e["event"] == "done"} == {"db", "vm", "web"}
    for name in ("vm", "web", "db"):
        held = await owner(h1, name)
        assert held is not None and held["host"] == "h2"
    with pytest.raises(ClusterError, match="host h1 is in maintenance"):
        await h1.s.lifecycle.create(c.domain("new"))
    hosts = {h["host"]: h for h in await h2.s.cluster_hosts()}
    assert hosts["h1"]["maintenance"] and not hosts["h2"]["maintenance"]
    await Evacuation(h2.s).activate("h1")
    await h1.s.lifecycle.create(c.domain("new"))


async def test_a_failed_migration_leaves_its_domain_and_the_evacuation_reports_it(
    cluster: tuple[Cluster, EtcdMember], monkeypatch: pytest.MonkeyPatch
) -> None:
    c, _ = cluster
    h1, h2 = c.hosts
    for name in ("vm", "web"):
        await h1.s.lifecycle.create(c.domain(name))
    real_prepare = h2.s.incoming.prepare_incoming

    async def refuse_web(migration_id: str, mapping: Any, *args: Any) -> Prepared:
        if mapping["name"] == "web":
            raise MigrationRefused("injected: no room for web")
        return await real_prepare(migration_id, mapping, *args)

    monkeypatch.setattr(h2.s.incoming, "prepare_incoming", refuse_web)
    result = await Evacuation(h1.s).run(
        [], 1, MigrationParams.from_wire({"live": True, "channels": 1}), print
    )
    assert [m["domain"] for m in result["moved"]] == ["vm"]
    [failed] = result["failed"]
    assert failed["domain"] == "web" and "no room for web" in failed["error"]
    assert result["left"] == ["web"]
    assert h1.s.table.get("web").record.state is DomainState.RUNNING
    held = await owner(h1, "web")
    assert held is not None and held["host"] == "h1"


async def test_evacuation_with_nowhere_to_go_says_so(cluster: tuple[Cluster, EtcdMember]) -> None:
    c, _ = cluster
    h1 = c.hosts[0]
    await h1.s.lifecycle.create(c.domain())
    assert h1.member is not None
    await h1.member.ownership.set_maintenance("h2", True, by="test")
    with pytest.raises(ClusterError, match="cannot evacuate h1 to h2: h2 is in maintenance"):
        await Evacuation(h1.s).run(["h2"], 1, MigrationParams.from_wire({"channels": 1}), print)
    with pytest.raises(ClusterError, match="no host is up and out of maintenance"):
        await Evacuation(h1.s).run([], 1, MigrationParams.from_wire({"channels": 1}), print)
    await c.assert_runs_once("h1")


# -- HA restart ----------------------------------------------------------------------


async def kill_host(c: Cluster, h: FakeHost) -> None:
    """The whole host dies at once: ferryd, its fencer and its QEMUs."""
    await h.crash()
    assert h.member is not None
    fencer = h.member._running_fencer()
    assert fencer is not None
    os.kill(fencer, signal.SIGKILL)
    for pid, qmp in c.qemus().items():
        if qmp.startswith(str(h.config.run_dir)):
            os.kill(pid, signal.SIGKILL)
    await until(lambda: not process.is_alive(fencer), "the fencer to be gone")


async def test_a_failed_hosts_ha_domain_restarts_once_elsewhere_and_the_others_do_not(
    cluster: tuple[Cluster, EtcdMember],
) -> None:
    c, _ = cluster
    h1, h2 = c.hosts
    await h1.s.lifecycle.create(c.domain("vm") | {"on_host_failure": "restart"})
    await h1.s.lifecycle.create(c.domain("plain"))
    await kill_host(c, h1)
    died = time.monotonic()
    assert h2.s.ha is not None
    await until(lambda: h2.s.table.find("vm") is not None, "h2 to restart vm", timeout=20)
    took = time.monotonic() - died
    # Only after the lease expired (TTL), never before: the dead host was fenced.
    assert took >= c.etcd.lease_ttl - 1, took
    await c.assert_runs_once("h2")
    held = await owner(h2)
    assert held is not None and held["host"] == "h2"
    assert h2.member is not None
    ha = await h2.member.etcd.get(Keys("ferry").ha("vm"))
    assert ha is not None and decode(ha.value, ha.key)["state"] == "armed"
    assert decode(ha.value, ha.key)["restarts"] == 1
    assert h2.s.table.find("plain") is None and await owner(h2, "plain") is None
    assert [r["name"] for r in h2.s.ha.restarted] == ["vm"]


async def test_of_two_restarts_racing_exactly_one_wins(cluster: tuple[Cluster, EtcdMember]) -> None:
    c, _ = cluster
    h1, h2 = c.hosts
    await h1.s.lifecycle.create(c.domain("vm") | {"on_host_failure": "restart"})
    await kill_host(c, h1)
    assert h2.s.ha is not None and h2.member is not None
    await h2.s.ha.close()  # the test drives it

    async def orphan() -> Any:
        gone = await h2.member.etcd.get(Keys("ferry").domain("vm")) is None  # type: ignore[union-attr]
        return gone and await h2.member.etcd.get(Keys("ferry").ha("vm"))  # type: ignore[union-attr]

    entry = await wait_until(orphan, timeout=3 * c.etcd.lease_ttl, what="vm to be orphaned")
    record = decode(entry.value, entry.key)
    won = await asyncio.gather(
        h2.s.ha.restart("vm", entry, record), h2.s.ha.restart("vm", entry, record)
    )
    assert sorted(won) == [False, True]
    await c.assert_runs_once("h2")


async def test_a_domain_ended_on_purpose_is_not_restarted(
    cluster: tuple[Cluster, EtcdMember],
) -> None:
    c, _ = cluster
    h1, h2 = c.hosts
    await h1.s.lifecycle.create(c.domain("vm") | {"on_host_failure": "restart"})
    await h1.s.lifecycle.destroy("vm")
    await until(lambda: h1.s.table.find("vm") is None, "vm to end")
    assert h2.member is not None
    assert await h2.member.etcd.get(Keys("ferry").ha("vm")) is None


# -- the commit in etcd --------------------------------------------------------------


async def test_a_lost_commit_answer_is_resolved_by_etcd_while_the_target_is_down(
    cluster: tuple[Cluster, EtcdMember], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Standalone, the source would wait for the target's word; in a cluster etcd says."""
    c, _ = cluster
    h1, h2 = c.hosts
    await h1.s.lifecycle.create(c.domain())
    drop_message(monkeypatch, "committed", then=h2.crash)
    with pytest.raises(MigrationInDoubt):
        await h1.migrate("vm", h2)
    # h2's ferryd is down (its QEMU and fencer live on): h1 learns from etcd alone.
    await until(lambda: h1.s.table.find("vm") is None, "h1 to hand the domain over")
    held = await owner(h1)
    assert held is not None and held["host"] == "h2"
    await h2.start()
    await c.assert_runs_once("h2")


async def test_a_source_in_doubt_takes_its_domain_back_in_etcd_before_the_target_commits(
    cluster: tuple[Cluster, EtcdMember], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The commit never reached the target's etcd transaction: the source settles it as
    aborted in etcd, so that the target's late commit cannot apply, and runs the domain."""
    c, _ = cluster
    h1, h2 = c.hosts
    await h1.s.lifecycle.create(c.domain())
    real_decide = h2.s.launcher.ownership.decide_move
    settled = asyncio.Event()

    async def late_decide(ticket: Any, migration_id: str, commit: bool) -> bool:
        await settled.wait()  # the target's commit comes only after the source settled
        return await real_decide(ticket, migration_id, commit)

    monkeypatch.setattr(h2.s.launcher.ownership, "decide_move", late_decide)
    monkeypatch.setattr(source_mod, "COMMIT_TIMEOUT", 1.0)
    with pytest.raises(MigrationInDoubt):
        await h1.migrate("vm", h2)
    await until(
        lambda: h1.s.table.get("vm").record.state is DomainState.RUNNING, "h1 to run it again"
    )
    settled.set()
    await c.assert_runs_once("h1")
    held = await owner(h1)
    assert held is not None and held["host"] == "h1"


async def test_a_fencer_that_dies_is_replaced_and_takes_up_its_lease_and_stopped_vms(
    tmp_path: Path,
) -> None:
    async with etcd_cluster(tmp_path, lease_ttl=12) as (c, member):
        h1 = c.hosts[0]
        assert h1.member is not None
        await h1.s.lifecycle.create(c.domain())
        pid = h1.s.table.get("vm").pid
        lease = h1.member.lease.id
        member.freeze()
        try:
            await until(lambda: qemu_state(pid) == "T", "the QEMU to be stopped", timeout=12)
            fencer = h1.member._running_fencer()
            assert fencer is not None
            os.kill(fencer, signal.SIGKILL)
        finally:
            member.thaw()
        # ferryd starts a new fencer, which takes up the same lease and lets the VM go.
        await until(lambda: qemu_state(pid) in ("S", "R"), "the QEMU to run again", timeout=8)
        assert h1.member.fencer_pid != fencer
        assert h1.member.lease.id == lease
        await c.assert_runs_once("h1")


async def test_an_ha_restart_that_fails_is_marked_and_listed_not_retried(
    cluster: tuple[Cluster, EtcdMember],
) -> None:
    c, _ = cluster
    h1, h2 = c.hosts
    await h1.s.lifecycle.create(c.domain("vm") | {"on_host_failure": "restart"})
    await kill_host(c, h1)
    (c.storage / "vm.img").unlink()  # the disk is gone: no host can start it

    async def failed() -> list[dict[str, Any]] | None:
        rows = await h2.s.cluster_domains()
        return rows if rows and rows[0]["state"] == "restart failed" else None

    [row] = await wait_until(failed, timeout=4 * c.etcd.lease_ttl, what="the restart to fail")
    assert row["name"] == "vm" and row["host"] == "h2"
    assert "vm.img" in str(row["error"])
    assert h2.s.table.find("vm") is None and await owner(h2) is None
    assert h2.s.ha is not None and h2.s.ha.restarted == []
