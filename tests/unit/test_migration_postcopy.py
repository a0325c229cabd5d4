"""Post-copy's commit, end to end between two in-process hosts and fake QEMUs.

The source holds its stopped VM before the switch; the target commits there;
only then does the stream go through. Before that point a failure gives the
VM back to the source; after it the domain is the target's, and a lost link
loses it (the stated weaker guarantee). As in test_migration_protocol, every
test ends by asking the QEMU processes where the domain runs.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from ferry.domain.migration_state import Outcome
from ferry.domain.state import DomainState
from ferry.errors import MigrationInDoubt, PostcopyFailed
from ferry.migration import incoming as incoming_mod
from ferry.migration.channel import Channel
from ferry.migration.incoming import IncomingMigrations
from ferry.migration.params import MigrationParams

from .migration_harness import Cluster, running, until
from .test_migration_protocol import hosts, lose_committed_answer, ours_again, target_dropped


@pytest.fixture
async def created(tmp_path: Path) -> AsyncIterator[Cluster]:
    async with running(Cluster(tmp_path)) as c:
        await c.hosts[0].s.lifecycle.create(c.domain())
        yield c


async def test_postcopy_runs_the_domain_once_on_the_target(created: Cluster) -> None:
    h1, h2 = hosts(created)
    result = await h1.migrate("vm", h2, postcopy=True)
    assert result["postcopy"] is True and result["postcopy_s"] is not None
    assert [d["decision"] for d in result["decisions"]] == ["switching to post-copy"]
    assert result["switchover_ms"] is not None  # the target's RESUME, sent after the commit
    copy = await created.assert_runs_once("h2")
    assert copy["pid"] == h2.s.table.get("vm").pid
    assert h2.s.table.get("vm").record.state is DomainState.RUNNING
    assert h1.s.table.find("vm") is None
    assert h2.s.table.outcomes.get(result["migration_id"]) is Outcome.COMMITTED


async def test_a_paused_domain_arrives_paused_through_postcopy(created: Cluster) -> None:
    h1, h2 = hosts(created)
    await h1.s.lifecycle.pause("vm")
    result = await h1.migrate("vm", h2, postcopy=True)
    assert result["resumed"] is False
    await created.assert_runs_once("h2", running=False)
    assert h2.s.table.get("vm").record.state is DomainState.PAUSED


async def test_a_commit_refused_at_the_held_switch_gives_the_vm_back(
    created: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Nothing has gone past the switch: the held stream is cancelled, the VM runs here."""
    h1, h2 = hosts(created)

    async def refuse(self: IncomingMigrations, dom: Any, commit: bool) -> bool:
        return False  # the store no longer names the source the owner

    monkeypatch.setattr(IncomingMigrations, "decide_in_store", refuse)
    with pytest.raises(MigrationInDoubt):
        await h1.migrate("vm", h2, postcopy=True)
    await ours_again(h1, DomainState.RUNNING)
    await target_dropped(h2)
    await created.assert_runs_once("h1")


async def test_a_lost_commit_answer_at_the_held_switch_resolves_as_committed(
    created: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The source learns the outcome later, and only then lets the stream through."""
    h1, h2 = hosts(created)
    lose_committed_answer(monkeypatch)
    h1.s.source_end.retry_s = 0.2
    with pytest.raises(MigrationInDoubt):
        await h1.migrate("vm", h2, postcopy=True)
    await created.assert_runs_once("h2")
    assert h1.s.table.find("vm") is None
    assert h2.s.table.get("vm").record.state is DomainState.RUNNING


async def test_a_source_restarting_while_held_lets_the_committed_stream_through(
    created: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A held stream found at re-attach is in doubt, never cancelled blindly."""
    h1, h2 = hosts(created)
    lose_committed_answer(monkeypatch, then=h1.crash)
    with pytest.raises(BaseException):  # noqa: B017
        await h1.migrate("vm", h2, postcopy=True)
    await h1.start()
    await created.assert_runs_once("h2")
    assert h1.s.table.find("vm") is None


async def test_a_break_after_the_switch_is_reported_as_the_domain_lost(
    created: Cluster,
) -> None:
    """The weaker guarantee, said as it is: never resumed on the source, never two copies."""
    h1, h2 = hosts(created)
    created.plan(source={"break_after_switch": True})
    with pytest.raises(PostcopyFailed, match="lost"):
        await h1.migrate("vm", h2, postcopy=True)
    assert h1.s.table.find("vm") is None  # the source's copy is ended, not resumed
    assert all(copy["host"] == "h2" for copy in created.copies())


async def test_the_target_waits_for_a_device_state_that_comes_late(
    created: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Committed, it runs the domain only once the source has let the stream through."""
    monkeypatch.setattr(incoming_mod, "STREAM_COMPLETE_TIMEOUT", 0.5)
    h1, h2 = hosts(created)
    lose_committed_answer(monkeypatch)
    h1.s.source_end.retry_s = 1.5
    with pytest.raises(MigrationInDoubt):
        await h1.migrate("vm", h2, postcopy=True)
    # Committed but not yet let through: the target holds its copy, not running.
    dom = h2.s.table.get("vm")
    assert dom.record.state is DomainState.MIGRATING_IN
    assert not (await h2.s.table.get("vm").monitor.execute("query-status"))["running"]
    await created.assert_runs_once("h2")


async def test_a_target_restarting_between_commit_and_device_state_runs_it_once_loaded(
    created: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its QEMU still waits for the device state: re-attach must not cont it too early."""
    h1, h2 = hosts(created)
    lose_committed_answer(monkeypatch, then=h2.crash)
    h1.s.source_end.retry_s = 0.3
    with pytest.raises(MigrationInDoubt):
        await h1.migrate("vm", h2, postcopy=True)
    await h2.start()
    await created.assert_runs_once("h2")
    assert h2.s.table.get("vm").record.state is DomainState.RUNNING
    assert h1.s.table.find("vm") is None


@pytest.mark.parametrize("postcopy", [False, True], ids=["pre-copy", "post-copy"])
async def test_a_migration_cancelled_while_its_commit_is_answered_is_never_kept(
    created: Cluster, monkeypatch: pytest.MonkeyPatch, postcopy: bool
) -> None:
    """Cancelled in doubt (ferryd stopping, say): the source asks; it never resumes blindly."""
    h1, h2 = hosts(created)
    h1.s.source_end.retry_s = 0.3
    real_recv = Channel.recv

    async def recv(self: Channel, timeout: float, expect: str | None = None) -> dict[str, Any]:
        if expect == "committed":
            await asyncio.Event().wait()  # the answer never comes in
        return await real_recv(self, timeout, expect)

    monkeypatch.setattr(Channel, "recv", recv)
    task = asyncio.create_task(h1.migrate("vm", h2, postcopy=postcopy))
    await until(lambda: h2.s.table.find("vm") is not None, "the target to commit")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await created.assert_runs_once("h2")
    assert h1.s.table.find("vm") is None


def test_a_pre_copy_request_still_reads_as_before_postcopy() -> None:
    """A target from before post-copy refuses unknown settings: none is sent when off."""
    assert "postcopy" not in MigrationParams().to_wire()
    assert MigrationParams(postcopy=True).to_wire()["postcopy"] is True
    assert MigrationParams.from_wire(MigrationParams().to_wire()) == MigrationParams()
