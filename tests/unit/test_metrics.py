"""ferryd's Prometheus metrics, scraped over HTTP after real events on fake peers."""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import pytest

from ferry import __version__
from ferry.cluster.lease_status import LeaseStatus, LeaseView
from ferry.config.host import MetricsConfig
from ferry.daemon.metrics import MetricsServer, register_state
from ferry.domain.migration_state import Phase
from ferry.errors import FerryError, MigrationAborted, MigrationError, MigrationRefused
from ferry.migration.outgoing import _failed_outcome
from ferry.util.metrics import Metrics

from .metrics_support import fetch, scrape, value
from .migration_harness import Cluster, running, until


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    async with running(Cluster(tmp_path)) as c:
        for host in c.hosts:
            register_state(host.s.metrics, host.name, host.s.table, None)
        yield c


async def test_a_migration_is_counted_and_timed_and_domains_move(cluster: Cluster) -> None:
    h1, h2 = cluster.hosts
    await h1.s.lifecycle.create(cluster.domain())
    before = await scrape(h1.s.metrics)
    assert value(before, "ferry_domains", state="running") == 1
    assert value(before, "ferry_migrations_total", outcome="completed") == 0
    result = await h1.migrate("vm", h2)
    source, target = await scrape(h1.s.metrics), await scrape(h2.s.metrics)
    assert value(source, "ferry_migrations_total", outcome="completed") == 1
    assert value(source, "ferry_migrations_total", outcome="kept") == 0
    assert value(source, "ferry_migration_duration_seconds_count") == 1
    assert value(source, "ferry_migration_duration_seconds_sum") == pytest.approx(
        result["total_s"], abs=1e-6
    )
    assert value(source, "ferry_migration_downtime_seconds_count") == 1
    assert value(source, "ferry_migration_bytes_sum") == result["bytes_sent"] > 0
    assert value(source, "ferry_domains", state="running") == 0
    assert value(target, "ferry_domains", state="running") == 1
    assert value(target, "ferry_domains_memory_mib") == 64
    assert value(target, "ferry_host_info", host="h2", version=__version__) == 1


async def test_a_refusal_is_counted_by_its_reason_and_the_source_keeps_the_vm(
    cluster: Cluster,
) -> None:
    h1, h2 = cluster.hosts
    await h1.s.lifecycle.create(cluster.domain())
    other = cluster.domain("other") | {"name": "vm"}  # same name, its own disk
    await h2.s.lifecycle.create(other)
    with pytest.raises(MigrationRefused, match="already runs there"):
        await h1.migrate("vm", h2)
    source, target = await scrape(h1.s.metrics), await scrape(h2.s.metrics)
    assert value(target, "ferry_relocation_refusals_total", reason="exists") == 1
    assert value(target, "ferry_relocation_refusals_total", reason="access") == 0
    assert value(source, "ferry_migrations_total", outcome="kept") == 1
    assert value(source, "ferry_migrations_total", outcome="completed") == 0
    assert value(source, "ferry_migration_duration_seconds_count") == 0


async def test_hosts_allow_refusals_count_as_access(tmp_path: Path) -> None:
    c = Cluster(tmp_path)
    h1, h2 = c.hosts
    h2.config = replace(
        h2.config, relocation=replace(h2.config.relocation, hosts_allow=("nobody",))
    )
    async with running(c):
        await h1.s.lifecycle.create(c.domain())
        with pytest.raises(MigrationRefused, match="hosts-allow"):
            await h1.migrate("vm", h2)
        target = await scrape(h2.s.metrics)
        await c.assert_runs_once("h1")
    assert value(target, "ferry_relocation_refusals_total", reason="access") == 1


def test_how_a_failed_migration_is_counted() -> None:
    failed = MigrationError("cut")
    assert _failed_outcome(Phase.TRANSFER, failed) == "kept"
    assert _failed_outcome(Phase.PREPARE, MigrationAborted("by you")) == "aborted"
    assert _failed_outcome(Phase.IN_DOUBT, failed) == "in_doubt"
    assert _failed_outcome(Phase.DONE, failed) == "lost"
    with pytest.raises(ValueError, match="unknown migration outcome"):
        Metrics().migration_ended("fine")


def test_a_reason_outside_the_fixed_set_is_other() -> None:
    assert MigrationRefused("no", "because I say so").reason == "other"
    metrics = Metrics()
    metrics.refused("nonsense")
    assert metrics.refusals.labels("other")._value.get() == 1


async def test_lease_and_fencing_are_read_from_the_fencers_status(tmp_path: Path) -> None:
    path = tmp_path / "fencer.json"
    LeaseStatus(
        pid=os.getpid(), lease_id=0x1234, state="held", valid_until=time.monotonic() + 30,
        margin=1.5, ttl=6, stopped=[], renewals={"ok": 7, "failed": 2},
        event_counts={"stopped": 1, "continued": 1},
    ).write(path)  # fmt: skip
    metrics = Metrics()
    register_state(metrics, "h1", _EmptyTable(), LeaseView(path))  # type: ignore[arg-type]
    text = await scrape(metrics)
    assert value(text, "ferry_lease_state", state="held") == 1
    assert value(text, "ferry_lease_state", state="lost") == 0
    assert value(text, "ferry_lease_renewals_total", result="ok") == 7
    assert value(text, "ferry_lease_renewals_total", result="failed") == 2
    assert value(text, "ferry_fencing_events_total", event="stopped") == 1
    assert value(text, "ferry_fencing_events_total", event="killed") == 0
    assert 25 < value(text, "ferry_lease_remaining_seconds") <= 30
    path.unlink()  # the fencer is gone: the lease is lost, the counters read 0
    text = await scrape(metrics)
    assert value(text, "ferry_lease_state", state="lost") == 1
    assert value(text, "ferry_lease_renewals_total", result="ok") == 0


class _EmptyTable:
    def everyone(self) -> list[object]:
        return []

    def leaving(self) -> list[object]:
        return []


async def test_the_server_answers_get_metrics_only() -> None:
    server = MetricsServer(MetricsConfig(port=0), Metrics())
    await server.start()
    try:
        assert (await asyncio.to_thread(fetch, server.port, "/"))[0] == 404
        assert (await asyncio.to_thread(fetch, server.port, "/metrics", "POST"))[0] == 405
        status, text = await asyncio.to_thread(fetch, server.port, "/metrics?x=1")
        assert status == 200 and "ferry_migrations_total" in text

        def raw(data: bytes) -> bytes:
            with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
                sock.sendall(data)
                return sock.recv(200)

        assert (await asyncio.to_thread(raw, b"nonsense\r\n\r\n")).startswith(b"HTTP/1.1 400")
        huge = b"GET /metrics HTTP/1.1\r\nX: " + b"a" * 20000 + b"\r\n\r\n"
        assert (await asyncio.to_thread(raw, huge)).startswith(b"HTTP/1.1 400")
    finally:
        await server.close()


async def test_a_port_taken_is_a_one_line_error() -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        server = MetricsServer(MetricsConfig(port=port), Metrics())
        with pytest.raises(FerryError, match=rf"cannot listen for metrics on 127.0.0.1:{port}"):
            await server.start()


async def test_migrations_in_progress_and_recent_ones_are_listed(cluster: Cluster) -> None:
    h1, h2 = cluster.hosts
    await h1.s.lifecycle.create(cluster.domain())
    cluster.plan(source={"hold_at": 256 * 1024})
    task = asyncio.create_task(h1.migrate("vm", h2))

    def moving() -> bool:
        rows = h1.s.outgoing.in_progress()
        return bool(rows) and rows[0]["progress"].get("transferred", 0) >= 256 * 1024

    await until(moving, "the migration's progress to be listed")
    (row,) = h1.s.outgoing.in_progress()
    assert row["name"] == "vm" and row["phase"] == "transfer"
    assert {"rate_mbit", "remaining", "passes", "expected_downtime_ms"} <= set(row["progress"])
    cluster.release()
    result = await task
    assert h1.s.outgoing.in_progress() == []
    (done,) = h1.s.outgoing.recent
    assert done["outcome"] == "completed" and done["target"] == "127.0.0.1"
    assert done["bytes_sent"] == result["bytes_sent"]
