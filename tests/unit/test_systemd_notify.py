"""ferryd's side of sd_notify, against a real datagram socket standing in for systemd."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from ferry.daemon.systemd import JournalFormatter, Notifier, stderr_is_journal


@pytest.fixture
def systemd(tmp_path: Path) -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify"))
    sock.setblocking(False)
    yield sock
    sock.close()


def received(sock: socket.socket) -> list[str]:
    messages = []
    while True:
        try:
            messages.append(sock.recv(4096).decode())
        except BlockingIOError:
            return messages


async def test_ready_status_watchdog_and_stopping(systemd: socket.socket) -> None:
    env = {"NOTIFY_SOCKET": systemd.getsockname(), "WATCHDOG_USEC": "150000",
           "WATCHDOG_PID": str(os.getpid())}  # fmt: skip
    notifier = Notifier(env)
    assert notifier.watchdog_s == pytest.approx(0.15)
    notifier.ready("host h1: 2 domain(s) re-attached")
    assert received(systemd)[0] == "READY=1\nSTATUS=host h1: 2 domain(s) re-attached"

    async def pings() -> int:
        return received(systemd).count("WATCHDOG=1")

    count = 0
    async with asyncio.timeout(5):
        while count < 3:
            count += await pings()
            await asyncio.sleep(0.02)
    notifier.stopping("stopping")
    await notifier.close()
    assert "STOPPING=1\nSTATUS=stopping" in received(systemd)


def test_the_watchdog_of_another_process_is_not_ours(systemd: socket.socket) -> None:
    env = {"NOTIFY_SOCKET": systemd.getsockname(), "WATCHDOG_USEC": "150000",
           "WATCHDOG_PID": "1"}  # fmt: skip
    assert Notifier(env).watchdog_s == 0


def test_off_systemd_nothing_is_sent() -> None:
    notifier = Notifier({})
    assert not notifier.enabled
    notifier.ready("no one listens")  # no error, nothing to send to


def test_an_abstract_socket_is_named_with_a_leading_nul() -> None:
    name = f"ferry-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        Notifier({"NOTIFY_SOCKET": "@" + name}).send("READY=1")
        assert sock.recv(100) == b"READY=1"


def test_journal_lines_carry_their_priority() -> None:
    formatter = JournalFormatter("%(message)s")
    record = logging.LogRecord("ferryd", logging.WARNING, __file__, 1, "two\nlines", None, None)
    assert formatter.format(record) == "<4>two\n<4>lines"
    assert not stderr_is_journal({"JOURNAL_STREAM": "0:0"})
