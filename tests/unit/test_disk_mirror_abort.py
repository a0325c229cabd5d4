"""How an aborted disk copy ends QEMU's connections to the target's exports.

Seen in the lab: with ``--sync-writes`` and the link cut, the connections shut
from outside (``shutdown(2)`` on QEMU's sockets) were reconnected by the next
guest write, and QEMU 7.2 died of heap corruption in a few aborts out of
ten: the VM lost on the source. QEMU's own ``yank`` makes a node quit for good.
These tests hold the order: yank first, the outside shut only if QEMU could
not yank, then the cancel.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytest

from ferry.errors import QmpError
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


def mirror(qemu: FakeQemu) -> DiskMirror:
    storage = {"port": 10809, "exports": {"0": "ferry-vm-0"}}
    copy = DiskMirror(qemu, None, "h2", "10.0.0.2", storage, [0], 4242, sync_writes=True)  # type: ignore[arg-type]
    copy._nodes, copy._jobs = [NODE], [JOB]
    return copy


async def test_an_abort_yanks_the_nodes_before_it_cancels(shut: list[Any]) -> None:
    qemu = FakeQemu()
    await mirror(qemu).abort()
    assert qemu.sent[0] == ("yank", {"instances": [{"type": "block-node", "node-name": NODE}]})
    assert qemu.commands().index("block-job-cancel") > 0
    assert shut == []  # never from outside when QEMU yanked


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
