"""`ferry save` / `ferry restore` of a real guest under real QEMU: the guest goes on where it
stopped (same boot, its in-memory counter continuing), and a damaged file starts nothing."""

from __future__ import annotations

import json
import stat
import sys
from typing import Any

import pytest

from ferry.lab import netns

from .conftest import LabHost, wait_for

pytestmark = pytest.mark.integration
GUEST = "10.99.0.10"


def witness(host: LabHost) -> dict[str, Any] | None:
    """The guest's witness service (ferry_ledger): its boot id and in-memory counter."""
    code = (
        "import sys, urllib.request; sys.stdout.write(urllib.request.urlopen("
        f"'http://{GUEST}:8890/status', timeout=5).read().decode())"
    )
    result = netns.run(host.ns, [sys.executable, "-c", code], timeout=30)
    return json.loads(result.stdout) if result.returncode == 0 else None


def test_save_then_restore_goes_on_without_a_reboot(booted: LabHost) -> None:
    before = wait_for(lambda: witness(booted) is not None, 60, "the guest's witness")
    assert before >= 0
    first = witness(booted)
    assert first is not None
    path = booted.workdir / "virt_server.save"
    code, out, err = booted.ferry("save", "virt_server", str(path))
    assert code == 0, err
    print(out.strip())
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert not booted.qemu_pids()
    code, out, _err = booted.ferry("list", "--json")
    assert json.loads(out) == []

    # A damaged copy is refused before any QEMU starts.
    broken = booted.workdir / "broken.save"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    broken.write_bytes(bytes(data))
    code, _out, err = booted.ferry("restore", str(broken))
    assert code == 1 and "is corrupt" in err, err
    assert not booted.qemu_pids()

    code, out, err = booted.ferry("restore", str(path))
    assert code == 0, err
    print(out.strip())
    wait_for(lambda: witness(booted) is not None, 60, "the restored guest's witness")
    after = witness(booted)
    assert after is not None
    assert after["boot_id"] == first["boot_id"], "the guest rebooted"
    assert after["counter"] >= first["counter"], (first, after)
    assert len(booted.qemu_pids()) == 1
