"""Mutual TLS on the relocation channel and QEMU's TLS on the memory stream.

Two in-process hosts with real certificates of a test CA and fake QEMUs whose
stream really runs through TLS (see fake_qemu.py). Each refusal leaves the
domain running where it was, once.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import pytest

from ferry.errors import MigrationError, MigrationRefused
from ferry.pki.identity import Identity, Role
from ferry.pki.qemu_tls import QemuTls

from .migration_harness import Cluster, FakeHost, qmp_call, running
from .pki_support import TestCA


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    async with running(Cluster(tmp_path), start=False) as c:
        yield c


async def up(c: Cluster) -> tuple[FakeHost, FakeHost]:
    for host in c.hosts:
        await host.start()
    await c.hosts[0].s.lifecycle.create(c.domain())
    return c.hosts[0], c.hosts[1]


def ca_of(c: Cluster) -> TestCA:
    assert c.ca is not None
    return c.ca


def allow(host: FakeHost, *patterns: str) -> None:
    host.config = replace(
        host.config, relocation=replace(host.config.relocation, hosts_allow=patterns)
    )


async def test_the_stream_runs_in_tls_and_admits_the_source_only(cluster: Cluster) -> None:
    h1, h2 = await up(cluster)
    assert (await h1.migrate("vm", h2))["stream"] == "tls"
    copy = await cluster.assert_runs_once("h2")
    tls = await asyncio.to_thread(qmp_call, cluster.qemus()[copy["pid"]], "x-fake-tls")
    # The target's QEMU saw the source's certificate, and admits exactly it.
    assert tls["peer"] == "O=ferry,OU=host,CN=h1"
    assert tls["params"]["tls-creds"] and tls["params"]["tls-authz"]


async def test_the_target_qemu_refuses_a_stream_from_another_host(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Were the channel's identity lost on the way to QEMU, the stream would fail."""
    original = QemuTls.setup_target

    async def admit_someone_else(self: QemuTls, monitor: object, source: Identity) -> None:
        await original(self, monitor, replace(source, gnutls_dn="O=ferry,OU=host,CN=h9"))  # type: ignore[arg-type]

    monkeypatch.setattr(QemuTls, "setup_target", admit_someone_else)
    h1, h2 = await up(cluster)
    with pytest.raises(MigrationError):
        await h1.migrate("vm", h2)
    await cluster.assert_runs_once("h1")


async def test_a_revoked_source_is_refused_and_keeps_its_domain(cluster: Cluster) -> None:
    h1, h2 = await up(cluster)
    ca = ca_of(cluster)
    ca.ca.revoke("h1")
    assert h2.credentials is not None
    ca.publish_crl(h2.credentials)  # h2 learns it at its next handshake, no restart
    with pytest.raises(MigrationRefused, match=r"host h1 .* is revoked"):
        await h1.migrate("vm", h2)
    await cluster.assert_runs_once("h1")


@pytest.mark.parametrize(("pattern", "allowed"), [("h1", True), ("h[0-9]", True), ("h9", False)])
async def test_hosts_allow_matches_the_certificate_name_whole(
    cluster: Cluster, pattern: str, allowed: bool
) -> None:
    allow(cluster.hosts[1], pattern)
    h1, h2 = await up(cluster)
    if allowed:
        await h1.migrate("vm", h2)
        await cluster.assert_runs_once("h2")
    else:
        with pytest.raises(MigrationRefused, match=r"from 127\.0\.0\.1 \(h1, 127\.0\.0\.1\)"):
            await h1.migrate("vm", h2)
        await cluster.assert_runs_once("h1")


async def test_an_operator_certificate_cannot_push_a_domain(cluster: Cluster) -> None:
    cluster.hosts[0].credentials = ca_of(cluster).credentials("alice", Role.ADMIN)
    h1, h2 = await up(cluster)
    with pytest.raises(MigrationRefused, match=r"from hosts only, not from .*admin alice"):
        await h1.migrate("vm", h2)
    await cluster.assert_runs_once("h1")


async def test_a_target_whose_certificate_names_another_host_is_refused(
    cluster: Cluster,
) -> None:
    # h2's certificate names h2 only, not the address the source dials.
    cluster.hosts[1].credentials = ca_of(cluster).credentials("h2b", addresses=())
    h1, h2 = await up(cluster)
    with pytest.raises(MigrationRefused, match=r"does not name .127\.0\.0\.1."):
        await h1.migrate("vm", h2)
    await cluster.assert_runs_once("h1")


async def test_a_host_of_another_ca_fails_the_handshake(cluster: Cluster, tmp_path: Path) -> None:
    cluster.hosts[0].credentials = TestCA(tmp_path / "stranger").credentials("h1")
    h1, h2 = await up(cluster)
    with pytest.raises(MigrationRefused, match=r"TLS with relocation server .* failed"):
        await h1.migrate("vm", h2)
    await cluster.assert_runs_once("h1")


async def test_plain_requests_are_refused_by_a_secure_host(cluster: Cluster) -> None:
    """In plain TCP only a memory stream's header may come: no hello, no status."""
    _h1, h2 = await up(cluster)
    for kind in ("hello", "status"):
        reader, writer = await asyncio.open_connection("127.0.0.1", h2.port)
        writer.write(json.dumps({"type": kind, "version": 1}).encode() + b"\n")
        answer = json.loads(await asyncio.wait_for(reader.readline(), 5))
        writer.close()
        assert answer["kind"] == "refused", answer
        assert f"takes no '{kind}' request in plain TCP" in answer["message"]


async def test_an_insecure_cluster_migrates_in_plain(tmp_path: Path) -> None:
    async with running(Cluster(tmp_path, secure=False), start=False) as c:
        h1, h2 = await up(c)
        assert (await h1.migrate("vm", h2))["stream"] == "none"
        copy = await c.assert_runs_once("h2")
        tls = await asyncio.to_thread(qmp_call, c.qemus()[copy["pid"]], "x-fake-tls")
        assert tls["peer"] is None and not tls["params"].get("tls-creds")
