"""The source answers once the domain is the target's, before its old copy has ended.

Its QEMU ends behind the answer. Until it has, the domain is no longer this
host's (not found, not listed), yet its name, memory and disks stay held:
a migration straight back waits for it, and a ferryd restarting in between
ends it as handed over. Every test ends by asking the QEMU processes.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from ferry.domain.state import DomainState
from ferry.storage import lease

from .migration_harness import Cluster, FakeHost, running
from .test_migration_protocol import hosts


@pytest.fixture
async def created(tmp_path: Path) -> AsyncIterator[Cluster]:
    async with running(Cluster(tmp_path)) as c:
        await c.hosts[0].s.lifecycle.create(c.domain())
        yield c


def slow_end(host: FakeHost, delay: float) -> None:
    """``host`` takes ``delay`` seconds before it starts to end a QEMU."""
    real = host.s.launcher.end_qemu

    async def end_qemu(dom: Any) -> None:
        await asyncio.sleep(delay)
        await real(dom)

    host.s.launcher.end_qemu = end_qemu  # type: ignore[method-assign]


async def test_the_answer_comes_before_the_old_copy_has_ended(created: Cluster) -> None:
    h1, h2 = hosts(created)
    slow_end(h1, 1.0)
    await h1.migrate("vm", h2)
    # Answered: the old QEMU still runs its course, but the domain is not ours.
    assert len(created.qemus()) == 2
    assert h1.s.table.find("vm") is None
    assert [r["name"] for r in h1.s.lifecycle.list_rows()] == []
    # ... yet its disk is still held here: no other domain may take it meanwhile.
    assert [d.name for d in h1.s.table.leaving()] == ["vm"]
    assert [name for name, _ in h1.s.table.disks_in_use(h1.config.storage_roots)] == ["vm"]
    await created.assert_runs_once("h2")
    assert h1.s.table.leaving() == []


async def test_migrating_straight_back_waits_for_the_old_copy(created: Cluster) -> None:
    h1, h2 = hosts(created)
    slow_end(h1, 0.5)
    real_launch = h1.s.launcher.launch
    left_at_launch: list[list[str]] = []

    async def launch(*args: Any, **kwargs: Any) -> Any:
        left_at_launch.append([d.name for d in h1.s.table.leaving()])
        return await real_launch(*args, **kwargs)

    h1.s.launcher.launch = launch  # type: ignore[method-assign]
    await h1.migrate("vm", h2)
    await h2.migrate("vm", h1)
    assert left_at_launch == [[]]  # the old copy had ended before the new one started
    copy = await created.assert_runs_once("h1")
    assert copy["pid"] == h1.s.table.get("vm").pid
    held = lease.read_lease(str(created.storage / "vm.img"))
    assert held is not None and held.host == "h1"


async def test_a_source_restarting_before_its_old_copy_ended_ends_it(created: Cluster) -> None:
    h1, h2 = hosts(created)
    slow_end(h1, 30.0)
    await h1.migrate("vm", h2)
    await h1.restart()
    await created.assert_runs_once("h2")
    assert h1.s.table.find("vm") is None and h1.s.table.leaving() == []
    held = lease.read_lease(str(created.storage / "vm.img"))
    assert held is not None and held.host == "h2"  # handed over: never released by h1
    assert h2.s.table.get("vm").record.state is DomainState.RUNNING
