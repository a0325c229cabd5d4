"""`--copy-storage` while the guest writes its disk hard, on the 100 Mbit link, under TLS.

Users of other toolstacks report mirrors that never finish, or stall near their
end, under TLS while the guest writes. Here the guest writes a file on the very
disk being copied, each step synced through, at a good share of the link's
12.5 MB/s, from before the copy until after the switch. The migration must come
home (the disk's last blocks copied with the VM stopped), the guest's writes go
on on the target, and no acknowledged ledger write is lost.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from ferry.guest.image import GuestImage
from ferry.util.wait import wait_until_sync

from .test_convergence_lab import dirty
from .test_migration_lab import Scenario, lab_up

pytestmark = pytest.mark.integration
RATE_MIB = 4.0  # about a third of the link, every byte of it new on the disk
WSS_MIB = 64


@pytest.fixture
def writing(request: pytest.FixtureRequest, guest_image: GuestImage) -> Iterator[Scenario]:
    with lab_up(request, "local", "100mbit") as lab:
        s = Scenario(lab)
        s.create()
        dirty(lab, "start", "--rate", str(RATE_MIB), "--wss", str(WSS_MIB), "--disk")
        wait_until_sync(
            lambda: dirty(lab, "status")["mib_s"] >= RATE_MIB * 0.8,
            timeout=60, interval=0.5, what="the guest to write its disk at the rate asked",
        )  # fmt: skip
        yield s


@pytest.mark.parametrize("flags", [(), ("--sync-writes",)], ids=["background", "sync-writes"])
def test_a_guest_writing_its_disk_hard_still_moves(
    writing: Scenario, flags: tuple[str, ...]
) -> None:
    s = writing
    before = s.status()
    writer = s.start_writes(seconds=60)
    pages = dirty(s.lab, "status")["pages"]
    result = s.migrate("xen_host_1", "xen_host_2", "-l", "--copy-storage", *flags)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    shown = ("total_s", "disk_copy_s", "disk_final_ms", "switchover_ms", "disk_bytes",
             "switch_trace_ms", "stream")  # fmt: skip
    print("copy-storage under writes", flags, {k: out.get(k) for k in shown})
    s.runs_only_on("xen_host_2", before)
    after = dirty(s.lab, "status")
    assert after["running"] and after["disk"] and after["pages"] > pages
    wait_until_sync(
        lambda: dirty(s.lab, "status")["pages"] > after["pages"], timeout=10,
        what="the guest's disk writes to go on after the migration",
    )  # fmt: skip
    s.check_writes(writer)
