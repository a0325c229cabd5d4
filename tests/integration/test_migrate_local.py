"""Migration to the same host, as ``xm migrate -l vm localhost`` did."""

from __future__ import annotations

import json
import sys

import pytest

from ferry.hypervisor import process
from ferry.lab import netns
from ferry.lab.witness import check_ledger

from .conftest import LabHost, wait_for

pytestmark = pytest.mark.integration
GUEST = "10.99.0.10"


def witness(host: LabHost, *args: str) -> str:
    result = netns.run(host.ns, [sys.executable, "-m", "ferry.lab.witness", *args], timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout


def guest_status(host: LabHost) -> dict[str, float]:
    wait_for(
        lambda: (
            netns.run(
                host.ns, [sys.executable, "-m", "ferry.lab.witness", "status", GUEST]
            ).returncode
            == 0
        ),
        60,
        "the guest's witness service",
    )
    return json.loads(witness(host, "status", GUEST))  # type: ignore[no-any-return]


def listed(host: LabHost) -> dict[str, dict[str, object]]:
    code, out, err = host.ferry("list", "--json")
    assert code == 0, err
    return {row["name"]: row for row in json.loads(out)}


@pytest.mark.parametrize("live", [True, False], ids=["live", "stop-and-copy"])
def test_migrate_to_localhost(booted: LabHost, live: bool) -> None:
    before = listed(booted)["virt_server"]
    seen = guest_status(booted)
    witness(booted, "append", GUEST, "--out", str(booted.workdir / "acked"), "--duration", "1")
    live_flag = ["-l"] if live else []
    code, out, err = booted.ferry(
        "migrate", *live_flag, "--bandwidth", "100", "--json", "virt_server", "localhost"
    )
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
    now = guest_status(booted)
    assert now["boot_id"] == seen["boot_id"], "the guest rebooted"
    assert now["counter"] > seen["counter"] and now["uptime"] > seen["uptime"]
    acked = (booted.workdir / "acked").read_text().splitlines()
    assert check_ledger(acked, [int(x) for x in witness(booted, "ledger", GUEST).split()]) == []
    # The source's QEMU itself says its stream was TLS: x509 on one stream, the
    # one-time key on multifd channels, each of which got the low-water mark.
    if result["channels"] > 1:
        assert result["stream"] == "tls-psk" and result["compression"] == "zstd"
        assert result["tuned_channels"] == result["channels"] + 1
    else:
        assert result["stream"] == "tls"
