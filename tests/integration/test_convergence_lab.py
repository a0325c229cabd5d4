"""A guest that dirties memory faster than the 100 Mbit link sends it.

Plain pre-copy would never finish (the bench shows it); ferry's policy must
bring the migration home with no flags, the guest's work going on all the while;
and a migration held to a downtime it cannot meet must end with the reason,
the VM still running where it was.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from ferry.guest.image import GuestImage
from ferry.lab.lab import Lab
from ferry.util.wait import wait_until_sync

from .test_migration_lab import VM, Scenario, lab_up

pytestmark = pytest.mark.integration
RATE_MIB = 25.0  # 2x the link's 12.5 MB/s
WSS_MIB = 96


@pytest.fixture
def busy(request: pytest.FixtureRequest, guest_image: GuestImage) -> Iterator[Scenario]:
    with lab_up(request, "nfs", "100mbit") as lab:
        s = Scenario(lab)
        s.create()
        dirty(lab, "start", "--rate", str(RATE_MIB), "--wss", str(WSS_MIB))
        wait_until_sync(
            lambda: dirty(lab, "status")["mib_s"] >= RATE_MIB * 0.8,
            timeout=30, interval=0.5, what="the guest to dirty memory at the rate asked",
        )  # fmt: skip
        yield s


def dirty(lab: Lab, *args: str) -> dict[str, Any]:
    argv = ["python3", "-m", "ferry.lab.dirty", args[0], VM, *args[1:]]
    result = lab.run("client_2", argv, timeout=30)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)  # type: ignore[no-any-return]


def test_a_busy_guest_migrates_with_no_flags_and_keeps_working(busy: Scenario) -> None:
    s = busy
    before = s.status()
    pages = dirty(s.lab, "status")["pages"]
    result = s.migrate("xen_host_1", "xen_host_2", "-l")
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    shown = ("total_s", "switchover_ms", "passes", "downtime_limit_ms", "throttle_pct")
    print("converged:", {k: out[k] for k in shown}, out["decisions"])
    # It took the policy: QEMU's throttle at least, each step written down with its reason.
    assert out["decisions"], out
    assert all(d["why"] for d in out["decisions"])
    assert out["downtime_limit_ms"] <= 500
    s.runs_only_on("xen_host_2", before)
    after = dirty(s.lab, "status")
    assert after["running"] and after["pages"] > pages  # the work went on, it was not lost
    wait_until_sync(
        lambda: dirty(s.lab, "status")["pages"] > after["pages"], timeout=10,
        what="the workload to go on after the migration",
    )  # fmt: skip


def test_a_downtime_it_cannot_meet_ends_it_with_the_reason_on_the_source(busy: Scenario) -> None:
    s = busy
    before = s.status()
    result = s.migrate(
        "xen_host_1", "xen_host_2", "-l", "--max-downtime", "100", "--no-auto-converge",
        "--compression", "none", "--give-up-after", "15",
    )  # fmt: skip
    assert result.returncode != 0
    assert "not converging" in result.stderr and "keeps running here" in result.stderr
    s.runs_only_on("xen_host_1", before)
    pages = dirty(s.lab, "status")["pages"]
    wait_until_sync(
        lambda: dirty(s.lab, "status")["pages"] > pages, timeout=10,
        what="the workload to go on on the source",
    )  # fmt: skip


def test_postcopy_ends_a_busy_guests_migration_after_one_pass(busy: Scenario) -> None:
    """The opt-in: one pre-copy pass, then the target runs the guest and pulls the rest."""
    s = busy
    before = s.status()
    pages = dirty(s.lab, "status")["pages"]
    result = s.migrate("xen_host_1", "xen_host_2", "-l", "--postcopy")
    assert result.returncode == 0, result.stderr
    assert "post-copy" in result.stderr  # the weaker guarantee is said before it starts
    out = json.loads(result.stdout)
    shown = ("total_s", "switchover_ms", "passes", "postcopy_s", "postcopy_requests")
    print("post-copy:", {k: out[k] for k in shown}, out["decisions"])
    assert out["postcopy"] is True and out["channels"] == 1
    assert [d["decision"] for d in out["decisions"]] == ["switching to post-copy"]
    assert out["passes"] <= 3 and out["postcopy_s"] is not None
    assert out["switchover_ms"] is not None  # the target's RESUME reached the source
    s.runs_only_on("xen_host_2", before)
    after = dirty(s.lab, "status")
    assert after["running"] and after["pages"] > pages
    wait_until_sync(
        lambda: dirty(s.lab, "status")["pages"] > after["pages"], timeout=10,
        what="the workload to go on after the post-copy",
    )  # fmt: skip
