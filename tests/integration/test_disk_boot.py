"""Guests that boot their own kernel from their own disk, as the classic pygrub guest did,
and qcow2 disks: created by ferryd, reaching the guest's witness service, live-migrated."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from ferry.guest.boot_disk import make_bootable_disk
from ferry.guest.image import make_domain_disk
from ferry.hypervisor.firmware import OVMF_VARS_TEMPLATE
from ferry.lab import netns

from .conftest import LabHost, wait_for

pytestmark = pytest.mark.integration
GUEST = "10.99.0.10"
# What an installed guest keeps in its own bootloader config: its address.
APPEND = f"ip={GUEST}::10.99.0.1:255.255.255.0:diskvm:eth0:off"

PYGRUB_CONFIG = """\
name = "diskvm"
memory = 256
vcpus = 1
bootloader = "/usr/bin/pygrub"
{firmware}
disk = [ "tap:aio:{disk},xvda,w" ]
vif = [ "mac=00:16:3e:4a:21:09,bridge=xenbr0" ]
"""


def witness_status(host: LabHost) -> dict[str, Any]:
    result = netns.run(
        host.ns, [sys.executable, "-m", "ferry.lab.witness", "status", GUEST], timeout=30
    )
    assert result.returncode == 0, result.stderr
    status = json.loads(result.stdout)
    assert isinstance(status, dict)
    return status


def create(host: LabHost, config: str) -> str:
    path = host.workdir / "diskvm"
    path.write_text(config)
    code, out, err = host.ferry("create", str(path))
    assert code == 0, err
    wait_for(lambda: host.ping(GUEST), 240, "the disk-booted guest to answer ping")
    wait_for(lambda: _answers(host), 60, "the guest's witness service")
    return out + err


def _answers(host: LabHost) -> bool:
    result = netns.run(
        host.ns, [sys.executable, "-m", "ferry.lab.witness", "status", GUEST], timeout=30
    )
    return result.returncode == 0


def migrate_to_itself(host: LabHost) -> None:
    before = host.qemu_pids()
    code, _out, err = host.ferry("migrate", "-l", "diskvm", "localhost")
    assert code == 0, err
    # The source's QEMU quits just after the commit, so the new one may be
    # seen beside it for a moment: wait for it to be alone.
    wait_for(
        lambda: len(now := host.qemu_pids()) == 1 and now != before,
        60,
        "the migrated QEMU to be the only one",
    )


def qemu_argv(host: LabHost) -> list[str]:
    (pid,) = host.qemu_pids()
    return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")


@pytest.mark.parametrize("firmware", ["bios", "uefi"])
def test_guest_boots_its_own_kernel_and_migrates(host: LabHost, firmware: str) -> None:
    disk = host.storage / "diskvm.img"
    make_bootable_disk(host.image, disk, firmware, APPEND)
    line = 'firmware = "uefi"' if firmware == "uefi" else ""
    notes = create(host, PYGRUB_CONFIG.format(disk=disk, firmware=line))
    assert "bootloader='/usr/bin/pygrub' mapped" in notes
    argv = qemu_argv(host)
    assert "-kernel" not in argv, "the guest's own bootloader, not ferry, loads the kernel"
    booted = witness_status(host)
    nvram = host.ferryd.state_dir / "nvram" / "diskvm.fd"
    if firmware == "uefi":
        assert any(a.startswith("if=pflash") and str(nvram) in a for a in argv)
        # OVMF wrote its boot entries into the domain's own variables.
        assert nvram.read_bytes() != OVMF_VARS_TEMPLATE.read_bytes()
    else:
        assert not nvram.exists()
    migrate_to_itself(host)
    wait_for(lambda: _answers(host), 60, "the guest's witness service after migrating")
    after = witness_status(host)
    assert after["boot_id"] == booted["boot_id"], "the guest rebooted instead of moving"
    assert after["counter"] > booted["counter"]


def test_qcow2_overlay_boots_and_migrates(host: LabHost) -> None:
    base = host.storage / "base.img"
    make_domain_disk(host.image, base)
    overlay = host.storage / "diskvm.qcow2"
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.img", "-F", "raw", str(overlay)],
        check=True,
    )
    base_written = base.stat().st_mtime_ns
    config = PYGRUB_CONFIG.format(disk=overlay, firmware='kernel = "ferry"\nip = "10.99.0.10"')
    create(host, config)
    assert any("format=qcow2,cache=none" in a for a in qemu_argv(host))
    booted = witness_status(host)
    migrate_to_itself(host)
    wait_for(lambda: _answers(host), 60, "the guest's witness service after migrating")
    assert witness_status(host)["boot_id"] == booted["boot_id"]
    # QEMU opened the backing file read-only: the guest's writes all went to the overlay.
    assert base.stat().st_mtime_ns == base_written


CLOUD_CONFIG = """\
name = "diskvm"
memory = 256
ip = "10.99.0.10"
netmask = "255.255.255.0"
[[disk]]
path = "{disk}"
[[vif]]
mac = "00:16:3e:4a:21:09"
bridge = "xenbr0"
[cloud_init]
hostname = "seeded-web"
"""


def test_cloud_init_seed_sets_hostname_and_address_kept_across_migration(host: LabHost) -> None:
    disk = host.storage / "diskvm.img"
    make_bootable_disk(host.image, disk, "bios")  # no address in the disk's own config
    (host.workdir / "diskvm.toml").write_text(CLOUD_CONFIG.format(disk=disk))
    code, _out, err = host.ferry("create", str(host.workdir / "diskvm.toml"))
    assert code == 0, err
    wait_for(lambda: host.ping(GUEST), 240, "the guest to answer on the seed's address")
    wait_for(lambda: _answers(host), 60, "the guest's witness service")
    booted = witness_status(host)
    assert booted["hostname"] == "seeded-web"
    argv = qemu_argv(host)
    assert any(a.startswith("virtio-blk-pci,drive=seed0") for a in argv)
    migrate_to_itself(host)
    wait_for(lambda: _answers(host), 60, "the guest's witness service after migrating")
    after = witness_status(host)
    assert (after["hostname"], after["boot_id"]) == ("seeded-web", booted["boot_id"])


@pytest.mark.parametrize("problem", ["backing-outside", "corrupt-qcow2", "missing"])
def test_bad_disks_are_refused_in_one_line_and_nothing_starts(host: LabHost, problem: str) -> None:
    disk = host.storage / "diskvm.qcow2"
    if problem == "backing-outside":
        outside = host.workdir / "elsewhere.img"
        subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(outside), "8M"], check=True)
        subprocess.run(
            ["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(outside), "-F", "raw",
             str(disk)],
            check=True,
        )  # fmt: skip
        why = "outside this host's storage roots"
    elif problem == "corrupt-qcow2":
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "8M"], check=True)
        data = bytearray(disk.read_bytes())
        data[48:56] = (1 << 40).to_bytes(8, "big")  # the refcount table, far past the end
        disk.write_bytes(bytes(data))
        why = "is a corrupt qcow2 image"
    else:
        why = "does not exist"
    config = PYGRUB_CONFIG.format(disk=disk, firmware="")
    (host.workdir / "diskvm").write_text(config)
    code, _out, err = host.ferry("create", str(host.workdir / "diskvm"))
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("note:")]
    assert code == 1 and len(lines) == 1, err
    assert lines[0].startswith("ferry create: cannot create domain 'diskvm': "), err
    assert why in lines[0], err
    assert host.qemu_pids() == [] and host.stray_qemus() == []
