"""The migration protocol end to end between two in-process hosts and fake QEMUs.

Every test ends by asking the QEMU processes themselves where the domain runs:
exactly one copy in the whole cluster, on the expected host, running or
paused as it should be.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from ferry.domain.migration_state import Outcome, Phase
from ferry.domain.state import DomainState
from ferry.errors import MigrationAborted, MigrationError, MigrationInDoubt
from ferry.host.layout import HostLayout
from ferry.migration import incoming as incoming_mod
from ferry.migration import source as source_mod
from ferry.migration import switchover
from ferry.migration import target as target_mod
from ferry.migration.channel import Channel
from ferry.storage import lease

from .migration_harness import Cluster, FakeHost, qmp_call, running, until

HOLD_AT = 256 * 1024


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    # Short paths: unix sockets live under the hosts' run directories.
    async with running(Cluster(tmp_path)) as c:
        yield c


@pytest.fixture
async def created(cluster: Cluster) -> Cluster:
    await cluster.hosts[0].s.lifecycle.create(cluster.domain())
    return cluster


def hosts(c: Cluster) -> tuple[FakeHost, FakeHost]:
    return c.hosts[0], c.hosts[1]


async def start_migration(
    c: Cluster, faults: dict[str, Any] | None = None, **params: Any
) -> asyncio.Task[dict[str, Any]]:
    """A migration held midway: bytes are moving, the source waits for release()."""
    h1, h2 = hosts(c)
    c.plan(source={"hold_at": HOLD_AT, **(faults or {})})
    task = asyncio.create_task(h1.migrate("vm", h2, **params), name="test migration")

    def midway() -> bool:
        arriving = h2.services.table.everyone() if h2.services else []
        if not arriving or task.done():
            return task.done()
        dom = h1.s.table.find("vm")
        return bool(dom and dom.outgoing and dom.outgoing.phase is Phase.TRANSFER) and any(
            p.get("transferred", 0) >= HOLD_AT for p in h1.progress
        )

    await until(midway, "the migration to be midway")
    assert not task.done(), task.result()
    return task


async def ours_again(h1: FakeHost, state: DomainState) -> None:
    """The source has settled the migration: the domain is its own again, in ``state``."""
    await until(lambda: h1.s.table.get("vm").record.state is state, "the domain to be ours")


async def target_dropped(h2: FakeHost) -> None:
    """The target has ended its copy and decided the migration aborted."""
    await until(
        lambda: not h2.s.table.everyone() and not h2.s.table.outcomes.pending(),
        "the target to drop the domain",
    )


# -- success ----------------------------------------------------------------------


async def test_live_migration_runs_the_domain_once_on_the_target(created: Cluster) -> None:
    h1, h2 = hosts(created)
    result = await h1.migrate("vm", h2)
    assert result["resumed"] is True and result["bytes_sent"] > 0
    copy = await created.assert_runs_once("h2")
    assert h2.s.table.get("vm").record.state is DomainState.RUNNING
    assert h1.s.table.find("vm") is None
    assert h2.s.table.outcomes.get(result["migration_id"]) is Outcome.COMMITTED
    held = lease.read_lease(str(created.storage / "vm.img"))
    assert held is not None and held.host == "h2"
    assert copy["pid"] == h2.s.table.get("vm").pid


async def test_a_paused_domain_arrives_paused(created: Cluster) -> None:
    h1, h2 = hosts(created)
    await h1.s.lifecycle.pause("vm")
    result = await h1.migrate("vm", h2)
    assert result["resumed"] is False
    await created.assert_runs_once("h2", running=False)
    assert h2.s.table.get("vm").record.state is DomainState.PAUSED


async def test_outcomes_survive_a_restart_of_the_target(created: Cluster) -> None:
    h1, h2 = hosts(created)
    result = await h1.migrate("vm", h2)
    await h2.restart()
    assert h2.s.incoming.migration_outcome(result["migration_id"]) == "committed"
    assert h2.s.incoming.migration_outcome("0" * 32) == "unknown"
    await created.assert_runs_once("h2")


# -- abort and failures before the commit ------------------------------------------


@pytest.mark.parametrize("paused", [False, True], ids=["running", "paused"])
async def test_abort_midway_leaves_the_domain_as_it_was(created: Cluster, paused: bool) -> None:
    h1, h2 = hosts(created)
    if paused:
        await h1.s.lifecycle.pause("vm")
    task = await start_migration(created)
    await h1.s.outgoing.abort_migration("vm")
    with pytest.raises(MigrationAborted):
        await task
    # The stream stopped at once: QEMU cancelled it (it was held, not failed).
    ((_pid, qmp),) = [q for q in created.qemus().items() if "/h1/" in q[1]]
    assert qmp_call(qmp, "query-migrate")["status"] == "cancelled"
    created.release()
    await created.assert_runs_once("h1", running=not paused)
    state = h1.s.table.get("vm").record.state
    assert state is (DomainState.PAUSED if paused else DomainState.RUNNING)
    await target_dropped(h2)


async def test_a_cancel_that_never_settles_leaves_the_vm_running(
    created: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As on a cut link: QEMU stays 'cancelling' until TCP gives up, its VM running on."""
    monkeypatch.setattr(switchover, "SETTLE_TIMEOUT", 0.5)
    h1, h2 = hosts(created)
    task = await start_migration(created, {"cancel_hangs": True})
    await h1.s.outgoing.abort_migration("vm")
    with pytest.raises(MigrationAborted):
        await task
    await target_dropped(h2)
    await created.assert_runs_once("h1")
    assert h1.s.table.get("vm").record.state is DomainState.RUNNING


async def test_abort_after_the_commit_is_refused(created: Cluster) -> None:
    h1, _h2 = hosts(created)
    task = await start_migration(created)
    h1.s.table.get("vm").outgoing.advance(Phase.COMMIT)  # type: ignore[union-attr]
    with pytest.raises(Exception, match="already commit"):
        await h1.s.outgoing.abort_migration("vm")
    task.cancel()
    created.release()
    with pytest.raises(BaseException):  # noqa: B017
        await task


async def test_target_qemu_dying_midway_keeps_the_domain_on_the_source(created: Cluster) -> None:
    _h1, h2 = hosts(created)
    task = await start_migration(created)
    arriving = h2.s.table.everyone()[0]
    os.kill(arriving.pid, signal.SIGKILL)
    created.release()
    with pytest.raises(MigrationError):
        await task
    await created.assert_runs_once("h1")
    await target_dropped(h2)


async def test_target_ferryd_vanishing_midway_keeps_the_domain_on_the_source(
    created: Cluster,
) -> None:
    h1, h2 = hosts(created)
    h1.s.source_end.retry_s = 0.2
    task = await start_migration(created)
    await h2.crash()
    created.release()
    # The arriving QEMU lives on and may take the whole stream: then the source,
    # its commit unanswered, is in doubt until the restarted target says
    # "aborted" (having ended that QEMU, which nobody can commit any more).
    with pytest.raises(MigrationError):
        await task
    await h2.start()
    await ours_again(h1, DomainState.RUNNING)
    await created.assert_runs_once("h1")
    assert h1.s.table.get("vm").record.state is DomainState.RUNNING
    assert h2.s.table.outcomes.pending() == []


async def test_a_silent_source_is_dropped_by_the_target(
    created: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(source_mod, "HEARTBEAT_INTERVAL", 3600.0)
    monkeypatch.setattr(target_mod, "SILENCE_TIMEOUT", 0.5)
    _h1, h2 = hosts(created)
    task = await start_migration(created)
    with pytest.raises(MigrationError):
        await task
    created.release()
    await created.assert_runs_once("h1")
    assert h2.s.table.outcomes.pending() == []


async def test_source_ferryd_crashing_midway_then_restarting(created: Cluster) -> None:
    h1, h2 = hosts(created)
    task = await start_migration(created)
    await h1.crash()
    task.cancel()
    with pytest.raises(BaseException):  # noqa: B017
        await task
    await h1.start()
    created.release()
    await created.assert_runs_once("h1")
    assert h1.s.table.get("vm").record.state is DomainState.RUNNING
    await target_dropped(h2)


# -- the commit and its lost answer ------------------------------------------------


def drop_message(monkeypatch: pytest.MonkeyPatch, kind: str, then: Any = None) -> None:
    """The first ``kind`` message never leaves: its connection is cut (after ``then()``)."""
    real_send = Channel.send
    dropped = False

    async def send(self: Channel, message: dict[str, Any]) -> None:
        nonlocal dropped
        if message.get("type") == kind and not dropped:
            dropped = True
            if then is not None:
                await then()
            self.writer.transport.abort()
            raise MigrationError(f"injected: '{kind}' lost")
        await real_send(self, message)

    monkeypatch.setattr(Channel, "send", send)


def lose_committed_answer(monkeypatch: pytest.MonkeyPatch, then: Any = None) -> None:
    """The target commits, but its answer never reaches the source."""
    drop_message(monkeypatch, "committed", then)


async def test_lost_commit_answer_resolved_as_committed(
    created: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    h1, h2 = hosts(created)
    lose_committed_answer(monkeypatch)
    with pytest.raises(MigrationInDoubt):
        await h1.migrate("vm", h2)
    copy = await created.assert_runs_once("h2")
    assert h1.s.table.find("vm") is None
    assert copy["host"] == "h2"


async def test_lost_commit_answer_and_target_restart_never_run_twice(
    created: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The target resumed, restarted, and is asked: it must still say committed."""
    h1, h2 = hosts(created)
    lose_committed_answer(monkeypatch)
    h1.s.source_end.retry_s = 0.3
    with pytest.raises(MigrationInDoubt):
        await h1.migrate("vm", h2)
    await h2.restart()
    await created.assert_runs_once("h2")
    assert h1.s.table.find("vm") is None


async def test_commit_failing_on_the_target_resolves_as_aborted(
    created: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The target's stream never completes: it aborts; the source, in doubt, resumes."""
    monkeypatch.setattr(incoming_mod, "STREAM_COMPLETE_TIMEOUT", 0.5)
    h1, h2 = hosts(created)
    created.plan(target={"hold_complete": True})
    with pytest.raises(MigrationInDoubt):
        await h1.migrate("vm", h2)
    created.release()
    await created.assert_runs_once("h1")
    await ours_again(h1, DomainState.RUNNING)


async def test_in_doubt_paused_domain_stays_paused_when_aborted(
    created: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(incoming_mod, "STREAM_COMPLETE_TIMEOUT", 0.5)
    h1, h2 = hosts(created)
    await h1.s.lifecycle.pause("vm")
    created.plan(target={"hold_complete": True})
    with pytest.raises(MigrationInDoubt):
        await h1.migrate("vm", h2)
    created.release()
    await ours_again(h1, DomainState.PAUSED)
    await created.assert_runs_once("h1", running=False)


async def test_source_restarting_in_doubt_hands_over(
    created: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    h1, h2 = hosts(created)
    lose_committed_answer(monkeypatch, then=h1.crash)
    with pytest.raises(BaseException):  # noqa: B017
        await h1.migrate("vm", h2)
    await h1.start()
    await created.assert_runs_once("h2")
    assert h1.s.table.find("vm") is None


async def test_a_stale_copy_left_by_a_copy_in_doubt_is_marked_for_the_target(
    created: Cluster, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A --copy-storage migration whose source restarted in doubt: the hand-over after
    the restart still marks the disk left behind, so no standalone host starts it."""
    h1, h2 = hosts(created)
    stale = tmp_path / "stale.img"
    stale.write_bytes(b"the disk as it was when the copy finished")
    lose_committed_answer(monkeypatch, then=h1.crash)
    with pytest.raises(BaseException):  # noqa: B017
        await h1.migrate("vm", h2)
    record_file = HostLayout(h1.config.state_dir, h1.config.run_dir).record_file("vm")
    data = json.loads(record_file.read_text())
    data["copied_away"] = [str(stale)]  # as a --copy-storage migration records it
    record_file.write_text(json.dumps(data))
    await h1.start()
    await created.assert_runs_once("h2")
    held = lease.read_lease(str(stale))
    assert held is not None and (held.host, held.domain) == ("127.0.0.1", "vm")


async def test_target_crashing_after_resume_keeps_it_there(
    created: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    h1, h2 = hosts(created)
    lose_committed_answer(monkeypatch, then=h2.crash)
    h1.s.source_end.retry_s = 0.3
    with pytest.raises(MigrationInDoubt):
        await h1.migrate("vm", h2)
    await h2.start()
    await created.assert_runs_once("h2")
    assert h2.s.table.get("vm").record.state is DomainState.RUNNING


async def test_a_failure_after_the_commit_point_still_hands_over(
    created: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past the commit point the target owns the domain whatever fails: never two copies."""
    h1, h2 = hosts(created)

    async def broken(self: Any, dom: Any) -> None:
        raise RuntimeError("injected: fails after the commit point")

    monkeypatch.setattr(incoming_mod.IncomingMigrations, "_resume", broken)
    await h1.migrate("vm", h2)
    await created.assert_runs_once("h2", running=False)
    assert h1.s.table.find("vm") is None


async def test_no_resume_event_still_commits(created: Cluster) -> None:
    """A RESUME event that never comes is no reason to leave the source in doubt."""
    h1, h2 = hosts(created)
    created.plan(target={"silent_resume": True})
    result = await h1.migrate("vm", h2)
    assert result["resumed"] is True
    await created.assert_runs_once("h2")
    assert h2.s.incoming.migration_outcome(result["migration_id"]) == "committed"


# -- either daemon going down at each phase ----------------------------------------


def crash_on_message(monkeypatch: pytest.MonkeyPatch, kind: str, host: FakeHost) -> None:
    """``host``'s ferryd dies just as a ``kind`` message is about to go out."""
    drop_message(monkeypatch, kind, then=host.crash)


async def test_source_ferryd_dying_at_prepare(
    created: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    h1, h2 = hosts(created)
    crash_on_message(monkeypatch, "prepare", h1)
    with pytest.raises(BaseException):  # noqa: B017
        await h1.migrate("vm", h2)
    await h1.start()
    await created.assert_runs_once("h1")
    assert h1.s.table.get("vm").record.state is DomainState.RUNNING
    assert h2.s.table.everyone() == []


async def test_target_ferryd_dying_once_prepared(
    created: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    h1, h2 = hosts(created)
    crash_on_message(monkeypatch, "prepared", h2)
    with pytest.raises(MigrationError):
        await h1.migrate("vm", h2)
    await h2.start()
    await created.assert_runs_once("h1")
    assert h2.s.table.everyone() == [] and h2.s.table.outcomes.pending() == []


async def test_target_ferryd_stopping_midway(created: Cluster) -> None:
    """ferryd on SIGTERM aborts what arrives: nobody would be left to commit it."""
    _h1, h2 = hosts(created)
    task = await start_migration(created)
    await h2.stop()
    with pytest.raises(MigrationError):
        await task
    created.release()
    await created.assert_runs_once("h1")
    await h2.start()
    assert h2.s.table.everyone() == [] and h2.s.table.outcomes.pending() == []
