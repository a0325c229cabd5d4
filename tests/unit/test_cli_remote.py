"""Which ferryd `ferry` talks to: local by default, remote with --host or FERRY_HOST."""

from __future__ import annotations

from pathlib import Path

import pytest

from ferry.cli.main import _client, build_parser


def client_for(*argv: str):  # type: ignore[no-untyped-def]
    return _client(build_parser().parse_args(list(argv)))


def test_migrate_to_a_host_stays_local(monkeypatch: pytest.MonkeyPatch) -> None:
    """`migrate DOMAIN HOST` names the target, not the ferryd to ask."""
    monkeypatch.delenv("FERRY_HOST", raising=False)
    client = client_for("migrate", "-l", "vm", "xen_host_2")
    assert client.remote is None and client.path is not None


def test_host_option_and_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("FERRY_HOST", raising=False)
    client = client_for("--host", "xen_host_1:9003", "--pki", str(tmp_path), "list")
    assert client.remote == ("xen_host_1", 9003)
    assert client.credentials is not None and client.credentials.dir == tmp_path
    monkeypatch.setenv("FERRY_HOST", "xen_host_2")
    monkeypatch.setenv("FERRY_PKI", str(tmp_path))
    assert client_for("migrate", "vm", "xen_host_1").remote == ("xen_host_2", 8003)
    # An explicit socket wins over the environment.
    assert client_for("--connect", "/run/x.sock", "list").remote is None
