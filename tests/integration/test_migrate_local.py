"""Migration to the same host, as ``xm migrate -l vm localhost`` did."""

from __future__ import annotations

import json

import pytest

from ferry.hypervisor import process

from .conftest import LabHost, wait_for

pytestmark = pytest.mark.integration
GUEST = "10.99.0.10"


def listed(host: LabHost) -> dict[str, dict[str, object]]:
    code, out, err = host.ferry("list", "--json")
    assert code == 0, err
    return {row["name"]: row for row in json.loads(out)}


@pytest.mark.parametrize("live", [True, False], ids=["live", "stop-and-copy"])
def test_migrate_to_localhost(booted: LabHost, live: bool) -> None:
    before = listed(booted)["virt_server"]
    live_flag = ["-l"] if live else []
    code, out, err = booted.ferry("migrate", *live_flag, "--json", "virt_server", "localhost")
    assert code == 0, err
    result = json.loads(out)
    print(result)
    assert result["bytes_sent"] > 0
    assert result["resumed"] is True
    after = listed(booted)["virt_server"]
    assert after["state"] == "running"
    assert after["id"] != before["id"] and after["pid"] != before["pid"]
    wait_for(lambda: not process.is_alive(int(str(before["pid"]))), 30, "the source QEMU to end")
    assert len(listed(booted)) == 1
    wait_for(lambda: booted.ping(GUEST), 30, "the migrated guest to answer")
