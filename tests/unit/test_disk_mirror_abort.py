"""How an aborted disk copy ends QEMU's connections to the target's exports and its mirrors.

Seen in the lab: with ``--sync-writes`` and the link cut, the source QEMU died
at the abort ("malloc(): unsorted double linked list corrupted"): QEMU 7.2's
mirror frees its in-flight bitmap as it ends, while guest writes still pass
through it. So a write-blocking mirror stops on a target error rather than
ending by itself, and is ended with the VM stopped for that moment. Before
that, its NBD nodes are yanked (QEMU's own way: the node quits for good); the
sockets are shut from outside only if QEMU could not yank.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytest

from ferry.errors import MigrationError, QmpError
from ferry.hypervisor import qemu_sockets
from ferry.migration import disk_mirror
from ferry.migration.disk_mirror import DiskMirror, clear_leftovers

NODE, JOB = "ferry-mig-0", "ferry-mirror-0"


class FakeQemu:
    """The commands an abort sends, answered as QEMU 7.2 would."""

    def __init__(self, yank_refused: bool = False) -> None:
        self.domain = "vm"
        self.yank_refused = yank_refused
        self.sent: list[tuple[str, Any]] = []
        self.cancelled = False
        self.running = True
        self.io_status = "ok"

    async def execute(
        self, command: str, arguments: Mapping[str, object] | None = None, timeout: float = 30.0
    ) -> Any:
        self.sent.append((command, arguments))
        if command == "yank" and self.yank_refused:
            raise QmpError("QMP yank on domain 'vm' failed: Instance not found")
        if command == "block-job-cancel":
            self.cancelled = True
        if command == "query-jobs":
            status = "concluded" if self.cancelled else "running"
            return [{"id": JOB, "status": status}]
        if command == "query-named-block-nodes":
            return [{"node-name": NODE, "file": "nbd://10.0.0.2:10809/ferry-vm-0"}]
        if command == "query-status":
            return {"running": self.running, "status": "running" if self.running else "paused"}
        if command in ("stop", "cont"):
            self.running = command == "cont"
        if command == "query-block-jobs":
            return [{"device": JOB, "io-status": self.io_status}]
        return {}

    def commands(self) -> list[str]:
        return [command for command, _ in self.sent]


@pytest.fixture
def shut(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int, str | None]]:
    """Every outside shut, as (pid, port, host)."""
    done: list[tuple[int, int, str | None]] = []

    def fds(pid: int, port: int, host: str | None = None) -> dict[int, int]:
        done.append((pid, port, host))
        return {}

    monkeypatch.setattr(qemu_sockets, "socket_fds_to_port", fds)
    monkeypatch.setattr(qemu_sockets, "shut_down", lambda pid, fds: None)
    monkeypatch.setattr(disk_mirror, "ABORT_POLL_S", 0.001)
    return done


STORAGE = {"port": 10809, "exports": {"0": "ferry-vm-0"}}


def mirror(qemu: FakeQemu) -> DiskMirror:
    copy = DiskMirror(qemu, None, "h2", "10.0.0.2", STORAGE, [0], 4242, sync_writes=True)  # type: ignore[arg-type]
    copy._nodes, copy._jobs = [NODE], [JOB]
    return copy


async def test_an_abort_yanks_the_nodes_then_ends_the_mirror_with_the_vm_stopped(
    shut: list[Any],
) -> None:
    qemu = FakeQemu()
    await mirror(qemu).abort()
    assert qemu.sent[0] == ("yank", {"instances": [{"type": "block-node", "node-name": NODE}]})
    sent = qemu.commands()
    assert sent.index("stop") < sent.index("block-job-cancel") < sent.index("blockdev-del")
    assert sent[-1] == "cont" and qemu.running
    assert shut == []  # never from outside when QEMU yanked


async def test_an_abort_leaves_a_paused_vm_paused(shut: list[Any]) -> None:
    qemu = FakeQemu()
    qemu.running = False
    await mirror(qemu).abort()
    assert "stop" not in qemu.commands() and "cont" not in qemu.commands()
    assert "block-job-cancel" in qemu.commands()


async def test_a_write_blocking_mirror_stops_on_a_target_error(shut: list[Any]) -> None:
    """It never ends by itself while the guest writes through it."""
    qemu = FakeQemu()
    copy = DiskMirror(qemu, None, "h2", "10.0.0.2", STORAGE, [0], 4242, sync_writes=True)  # type: ignore[arg-type]
    assert copy.on_error == "stop"  # for both on-source-error and on-target-error
    background = DiskMirror(qemu, None, "h2", "10.0.0.2", STORAGE, [0], 4242)  # type: ignore[arg-type]
    assert background.on_error == "report"


@pytest.mark.parametrize("status", ["paused", "standby"])
async def test_a_mirror_stopped_on_an_error_is_a_failed_copy(shut: list[Any], status: str) -> None:
    """Paused while it copies, on standby once it had caught up (QEMU's job.c)."""
    qemu = FakeQemu()
    copy = mirror(qemu)
    qemu.execute = _paused(qemu.execute, status)  # type: ignore[method-assign]
    qemu.io_status = "failed"
    with pytest.raises(MigrationError, match="vda to h2 failed: it stopped on an I/O error"):
        await copy.progress()
    qemu.io_status = "ok"  # paused for a drain, say: not a failure
    assert not (await copy.progress()).ready


def _paused(execute: Any, status: str = "paused") -> Any:
    async def wrapped(command: str, arguments: Any = None, timeout: float = 30.0) -> Any:
        if command == "query-jobs":
            await execute(command, arguments, timeout)
            return [{"id": JOB, "status": status, "current-progress": 1, "total-progress": 2}]
        return await execute(command, arguments, timeout)

    return wrapped


async def test_a_node_qemu_cannot_yank_is_shut_from_outside(shut: list[Any]) -> None:
    qemu = FakeQemu(yank_refused=True)
    await mirror(qemu).abort()
    assert shut == [(4242, 10809, "10.0.0.2")]
    assert "block-job-cancel" in qemu.commands() and "blockdev-del" in qemu.commands()


async def test_leftover_nodes_are_yanked(shut: list[Any]) -> None:
    qemu = FakeQemu()
    await clear_leftovers(qemu, 4242)  # type: ignore[arg-type]
    yanks = [args for command, args in qemu.sent if command == "yank"]
    assert yanks == [{"instances": [{"type": "block-node", "node-name": NODE}]}]
    assert qemu.commands().index("yank") < qemu.commands().index("block-job-cancel")
    assert shut == []


async def test_leftover_nodes_qemu_cannot_yank_are_shut_by_their_address(shut: list[Any]) -> None:
    await clear_leftovers(FakeQemu(yank_refused=True), 4242)  # type: ignore[arg-type]
    assert shut == [(4242, 10809, "10.0.0.2")]


async def test_the_final_copy_stopped_on_a_write_error_fails_at_once(shut: list[Any]) -> None:
    """With the VM stopped for the switch, waiting out the finish timeout would be downtime."""
    qemu = FakeQemu()
    qemu.execute = _paused(qemu.execute, "standby")  # type: ignore[method-assign]
    qemu.io_status = "failed"
    with pytest.raises(MigrationError, match="stopped on an I/O error"):
        await disk_mirror._concluded(qemu, [JOB], 5.0, 0.001)  # type: ignore[arg-type]
