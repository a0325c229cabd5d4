"""`ferry migrate --copy-storage` in the lab: no shared storage, each host its own disks.

Both hosts see their own directory at the same path (``local`` storage,
:mod:`ferry.lab.private_dir`); the VM's disk starts on xen_host_1 only. The
links run at 100 Mbit and everything goes over the cluster CA's TLS: the disk
copy (QEMU's NBD) as the memory stream.

The promises checked: after a failure at any point (abort, the target's QEMU
killed, the link cut, all while the disk is being copied) the VM runs on the
source, exactly once and not rebooted, no acknowledged write lost, and the
target's partial copy is gone. After a success the VM runs on the target only,
the witness ledger holds every acknowledged write, the copy left on the source
cannot start the domain again, and (migrated back while paused, so that both
disks are still) the two disks are byte for byte the same. `ferry host
evacuate --copy-storage` then empties the host, the disk going along.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from ferry.guest.image import GuestImage
from ferry.lab.host_daemons import start_ferryd
from ferry.lab.lab import Lab
from ferry.util.wait import wait_until_sync

from .test_migration_lab import (
    CLIP,
    VM,
    Scenario,
    acked_records,
    assert_failed_back_to_source,
    fail_by_cutting_the_link,
    finish_watch,
    lab_up,
    playing,
    received_bytes,
    watch,
)

pytestmark = pytest.mark.integration
DISK = f"{VM}.img"


@pytest.fixture
def local_lab(request: pytest.FixtureRequest, guest_image: GuestImage) -> Iterator[Lab]:
    with lab_up(request, "local", "100mbit") as lab:
        yield lab


def copy_in_background(s: Scenario, *flags: str) -> subprocess.Popen[str]:
    argv = ["ferry", "migrate", "--json", "-l", "--copy-storage", *flags, VM, "xen_host_2"]
    return s.lab.popen("xen_host_1", argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def wait_for_disk_copy(s: Scenario, proc: subprocess.Popen[str]) -> None:
    """Until the target has its new disk and a good part of it has crossed the link."""
    target_disk = s.lab.local_dir("xen_host_2") / DISK
    wait_until_sync(
        lambda: proc.poll() is None and target_disk.exists(),
        timeout=60, interval=0.1, what="the target to make its copy of the disk",
    )  # fmt: skip
    start = received_bytes(s.lab, "xen_host_2")
    wait_until_sync(
        lambda: proc.poll() is None and received_bytes(s.lab, "xen_host_2") - start > 24 << 20,
        timeout=60, what="24 MiB of the disk to reach xen_host_2",
    )  # fmt: skip
    assert proc.poll() is None, f"the migration ended early: {proc.communicate()}"
    assert s.listed("xen_host_1")[VM]["state"] == "migrating-out"


def copy_removed(s: Scenario) -> None:
    target_disk = s.lab.local_dir("xen_host_2") / DISK
    wait_until_sync(
        lambda: not target_disk.exists() and VM not in s.listed("xen_host_2"),
        timeout=60, interval=0.25, what="the target to remove its partial copy",
    )  # fmt: skip
    leftovers = [p.name for p in s.lab.local_dir("xen_host_2").iterdir()]
    assert leftovers == [], leftovers


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def test_failures_while_the_disk_is_copied_leave_the_vm_on_the_source(local_lab: Lab) -> None:
    s = Scenario(local_lab)
    before = s.create()
    source_disk = local_lab.local_dir("xen_host_1") / DISK

    # An abort while the disk crosses.
    writer = s.start_writes(seconds=10)
    proc = copy_in_background(s)
    wait_for_disk_copy(s, proc)
    aborted = s.ferry("xen_host_1", "migrate", "--abort", VM)
    assert aborted.returncode == 0, aborted.stderr
    assert_failed_back_to_source(s, proc, before, "aborted", writer)
    copy_removed(s)

    # The target's QEMU killed while the disk crosses.
    writer = s.start_writes(seconds=10)
    proc = copy_in_background(s)
    wait_for_disk_copy(s, proc)
    pid = int(s.listed("xen_host_2")[VM]["pid"])
    subprocess.run(["kill", "-9", str(pid)], check=True)
    assert_failed_back_to_source(s, proc, before, "copy of disk|failed|closed", writer)
    copy_removed(s)

    # The target's ferryd killed while the disk crosses: the source learns it
    # from the channel; the next ferryd there finds the arrival never committed.
    writer = s.start_writes(seconds=10)
    proc = copy_in_background(s)
    wait_for_disk_copy(s, proc)
    daemon = local_lab.daemons["xen_host_2"].process
    assert daemon is not None
    os.kill(daemon.pid, signal.SIGKILL)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode != 0, out
    assert s.status()["boot_id"] == before["boot_id"]
    assert (local_lab.local_dir("xen_host_2") / DISK).exists()  # nobody there removed it yet
    start_ferryd(local_lab, "xen_host_2")
    copy_removed(s)
    s.runs_only_on("xen_host_1", before)
    s.check_writes(writer)
    print("target's ferryd killed:", err.strip())

    # The link cut while the disk crosses (no reset: requests hang until ferry
    # gives up on the stall and ends QEMU's NBD connections itself), with the
    # guest's writes waiting on the link (--sync-writes) meanwhile.
    writer = s.start_writes(seconds=30)
    proc = copy_in_background(s, "--sync-writes")
    wait_for_disk_copy(s, proc)
    err = fail_by_cutting_the_link(proc)
    assert "no progress" in err, err
    # The target hears nothing more from the source: it gives its copy up
    # (the abort may be lost on the cut link: then after its silence timeout).
    copy_removed(s)
    s.runs_only_on("xen_host_1", before)
    s.check_writes(writer)
    assert source_disk.exists()


def test_copy_storage_moves_the_vm_and_its_disk(local_lab: Lab) -> None:
    s = Scenario(local_lab)
    before = s.create()
    source_disk = local_lab.local_dir("xen_host_1") / DISK
    target_disk = local_lab.local_dir("xen_host_2") / DISK
    player = watch(local_lab, CLIP, local_lab.workdir / "watch.json")
    writer = s.start_writes(seconds=40)
    wait_until_sync(
        lambda: playing(local_lab.workdir / "watch.json") and acked_records(s) > 0,
        timeout=60, interval=0.2, what="the player to play and the guest's writes to flow",
    )  # fmt: skip
    result = s.migrate("xen_host_1", "xen_host_2", "-l", "--copy-storage")
    assert result.returncode == 0, result.stderr
    facts = json.loads(result.stdout)
    print("copy-storage 100mbit xen_host_1 -> xen_host_2:", result.stdout.strip())
    assert facts["disk_bytes"] >= 1 << 30 and facts["stream"].startswith("tls")
    s.runs_only_on("xen_host_2", before)
    finish_watch(player, local_lab.workdir / "watch.json")
    s.check_writes(writer)

    # The source's file is a stale copy now: it can never start the domain there.
    refused = s.ferry("xen_host_1", "create", str(local_lab.domain_config))
    assert refused.returncode != 0 and "xen_host_2" in refused.stderr, refused.stderr
    # Nor is a copy made over a disk that exists: the operator removes it first.
    again = s.ferry("xen_host_2", "migrate", "-l", "--copy-storage", VM, "xen_host_1")
    assert again.returncode != 0 and "exists here already" in again.stderr, again.stderr
    s.runs_only_on("xen_host_2", before)
    source_disk.unlink()
    (source_disk.parent / f"{DISK}.ferry-lease").unlink()

    # Back, paused: nothing writes either disk, so they must be the same.
    assert s.ferry("xen_host_2", "pause", VM).returncode == 0
    back = s.migrate("xen_host_2", "xen_host_1", "-l", "--copy-storage")
    assert back.returncode == 0, back.stderr
    assert s.listed("xen_host_1")[VM]["state"] == "paused"
    assert sha256(source_disk) == sha256(target_disk), "the disks differ after the copy"
    assert s.ferry("xen_host_1", "unpause", VM).returncode == 0
    s.runs_only_on("xen_host_1", before)
    s.check_writes(writer)

    # A host with local disks emptied for maintenance: each domain's disks go along.
    target_disk.unlink()
    (target_disk.parent / f"{DISK}.ferry-lease").unlink()
    evacuated = s.ferry("xen_host_1", "host", "evacuate", "xen_host_1", "--copy-storage")
    assert evacuated.returncode == 0, evacuated.stdout + evacuated.stderr
    s.runs_only_on("xen_host_2", before)
    assert target_disk.exists()
    s.check_writes(writer)
