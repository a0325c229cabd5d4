"""ferryd and ferry with real guests under TCG, in a network namespace."""

from __future__ import annotations

import json
import os
import pty
import select
import subprocess
import sys
import time

import pytest

from ferry.hypervisor import process
from ferry.lab import netns

from .conftest import LabHost, wait_for

pytestmark = pytest.mark.integration
GUEST = "10.99.0.10"


def listed(host: LabHost) -> dict[str, dict[str, object]]:
    code, out, err = host.ferry("list", "--json")
    assert code == 0, err
    return {row["name"]: row for row in json.loads(out)}


def tap_exists(host: LabHost, name: str) -> bool:
    return netns.run(host.ns, ["ip", "link", "show", name]).returncode == 0


def test_created_guest_answers_and_is_listed(booted: LabHost) -> None:
    row = listed(booted)["virt_server"]
    assert row["state"] == "running"
    assert row["mem"] == 256 and row["vcpus"] == 1
    assert row["accel"] == "tcg"
    assert tap_exists(booted, str(row["taps"][0]))
    master = netns.run(booted.ns, ["ip", "-o", "link", "show", str(row["taps"][0])]).stdout
    assert "master xenbr0" in master
    _, out, _ = booted.ferry("list")
    assert out.splitlines()[0].split() == ["Name", "ID", "Mem", "VCPUs", "State", "Time(s)"]
    assert out.splitlines()[1].split()[:5] == ["virt_server", str(row["id"]), "256", "1", "running"]


def test_pause_stops_answers_unpause_resumes(vm: LabHost) -> None:
    code, _, err = vm.ferry("pause", "virt_server")
    assert code == 0, err
    assert listed(vm)["virt_server"]["state"] == "paused"
    assert not vm.ping(GUEST, timeout=2)
    code, _, err = vm.ferry("pause", "virt_server")
    assert code == 1 and "it is paused" in err and len(err.strip().splitlines()) == 1
    code, _, err = vm.ferry("unpause", "virt_server")
    assert code == 0, err
    wait_for(lambda: vm.ping(GUEST), 30, "the guest to answer again")
    assert listed(vm)["virt_server"]["state"] == "running"


@pytest.mark.parametrize("how", ["stop", "kill"])
def test_guest_survives_a_ferryd_restart(vm: LabHost, how: str) -> None:
    before = listed(vm)["virt_server"]
    pid = int(str(before["pid"]))
    vm.ferryd.stop() if how == "stop" else vm.ferryd.kill()
    assert process.is_alive(pid), "QEMU must outlive its ferryd"
    assert vm.ping(GUEST, timeout=2)
    vm.ferryd.start()
    after = listed(vm)["virt_server"]
    assert (after["id"], after["pid"], after["state"]) == (before["id"], pid, "running")
    code, _, err = vm.ferry("pause", "virt_server")
    assert code == 0, err
    assert not vm.ping(GUEST, timeout=2)
    assert vm.ferry("unpause", "virt_server")[0] == 0
    wait_for(lambda: vm.ping(GUEST), 30, "the guest to answer after re-attach")


def assert_nothing_left(host: LabHost, pid: int, taps: list[str]) -> None:
    wait_for(lambda: not process.is_alive(pid), 30, "QEMU to end")
    assert listed(host) == {}
    for name in taps:
        assert not tap_exists(host, name)
    # Whatever the record's key (virt_server, or virt_server@<migration> once
    # it arrived by migration): no run files, no record left.
    assert list((host.ferryd.run_dir / "domains").iterdir()) == []
    assert list((host.ferryd.state_dir / "domains").glob("*/record.json")) == []


def test_guest_agent_gives_addresses_and_a_clean_shutdown(booted: LabHost) -> None:
    """ferry's guest runs qemu-ga: its addresses, and a power-off without ACPI."""
    wait_for(lambda: "10.99.0.10/24" in booted.ferry("list", "--long")[1], 60, "qemu-ga to answer")
    code, out, err = booted.ferry("info", "--json", "virt_server")
    assert code == 0, err
    assert json.loads(out)["addresses"] == ["10.99.0.10/24"]
    row = listed(booted)["virt_server"]
    code, out, err = booted.ferry("shutdown", "-w", "virt_server")
    assert code == 0, err
    assert "powered off (asked through the guest agent)" in out
    assert_nothing_left(booted, int(str(row["pid"])), list(row["taps"]))  # type: ignore[arg-type]
    console = (booted.ferryd.state_dir / "domains" / "virt_server" / "console.log").read_text()
    assert "ferry-guest: power off" in console
    assert "(power button)" not in console


def test_destroy_leaves_nothing_behind(vm: LabHost) -> None:
    row = listed(vm)["virt_server"]
    code, _, err = vm.ferry("destroy", "virt_server")
    assert code == 0, err
    assert_nothing_left(vm, int(str(row["pid"])), list(row["taps"]))  # type: ignore[arg-type]
    code, _, err = vm.ferry("destroy", "virt_server")
    assert code == 1 and "does not exist" in err


def test_missing_bridge_starts_nothing(host: LabHost) -> None:
    config = host.domain_config(bridge="nosuchbr")
    code, _, err = host.ferry("create", str(config))
    assert code == 1
    (error,) = [line for line in err.splitlines() if not line.startswith("note:")]
    assert "bridge 'nosuchbr' does not exist" in error
    assert listed(host) == {}
    assert host.qemu_pids() == []


def test_disk_outside_storage_roots_is_refused(host: LabHost) -> None:
    config = host.domain_config()
    text = config.read_text().replace(str(host.storage), "/etc")
    config.write_text(text.replace("/etc/virt_server.img", "/etc/passwd"))
    code, _, err = host.ferry("create", str(config))
    assert code == 1
    assert "outside this host's storage roots" in err
    assert host.qemu_pids() == []


def test_names_are_unique_on_a_host(booted: LabHost) -> None:
    code, _, err = booted.ferry("create", str(booted.domain_config()))
    assert code == 1
    assert "already running" in err
    assert len(listed(booted)) == 1


def test_console_gives_a_shell_and_ctrl_bracket_detaches(booted: LabHost) -> None:
    argv = netns.popen_argv(
        booted.ns,
        [sys.executable, "-m", "ferry.cli.main", "--connect", str(booted.ferryd.socket),
         "console", "virt_server"],
    )  # fmt: skip
    leader, follower = pty.openpty()
    proc = subprocess.Popen(argv, stdin=follower, stdout=follower, stderr=follower)
    os.close(follower)
    seen = b""

    def read_until(marker: bytes, timeout: float) -> bool:
        nonlocal seen
        deadline = time.monotonic() + timeout
        while marker not in seen and time.monotonic() < deadline:
            ready, _, _ = select.select([leader], [], [], 0.5)
            if ready:
                try:
                    seen += os.read(leader, 4096)
                except OSError:
                    break
        return marker in seen

    try:
        assert read_until(b"Escape character", 10)
        # The shell comes after getty's autologin, which may still be on its way
        # (a line typed before it is lost): wait for the prompt, nudging with Enter.
        deadline = time.monotonic() + 60
        while not read_until(b"root@virt_server", 2) and time.monotonic() < deadline:
            os.write(leader, b"\n")
        assert b"root@virt_server" in seen, seen[-500:]
        os.write(leader, b"echo ferry-$((6*7))\n")
        assert read_until(b"ferry-42", 30), seen[-500:]
        os.write(leader, b"\x1d")
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(leader)
