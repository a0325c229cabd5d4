"""Fuzzing the relocation port: whatever a peer sends, one line back, nothing changed.

A real target host (services and relocation server, on its own event loop in a
thread) takes hypothesis' inputs as the first message of a connection and as
the prepare message after a valid hello. Every answer must be a JSON line (an
error, or a status), the host must keep serving, no task may fail, and no QEMU
may start. ``FERRY_FUZZ_EXAMPLES`` sets the number of inputs per test (a small
sample by default; the dedicated run uses 100,000: ``bash scripts/fuzz.sh``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ferry.migration.channel import PROTOCOL_VERSION

from .fuzz_support import FUZZ, json_values
from .migration_harness import Cluster, FakeHost

KEYS = ["type", "migration_id", "config", "params", "disks", "boot", "token", "host", "version"]
messages = st.dictionaries(st.sampled_from(KEYS), json_values, max_size=6) | json_values
TYPES = ["hello", "prepare", "data", "status", "commit", "ping", "bogus"]


class Failures(logging.Handler):
    """Every error logged while fuzzing: a failed task, an unhandled exception."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


class Target:
    """A target host running on its own loop, for synchronous hypothesis tests."""

    def __init__(self, tmp: Path) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        # Insecure: the fuzzer speaks the protocol itself, in plain TCP (the
        # TLS layer in front of it is OpenSSL's, tested in test_relocation_tls).
        self.cluster = Cluster(tmp, secure=False)
        self.host: FakeHost = self.cluster.hosts[1]
        self.run(self.host.start())

    def run(self, work: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(work, self.loop).result(60)

    def close(self) -> None:
        try:
            self.run(self.host.crash())
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
        finally:
            self.cluster.kill_all()

    def exchange(self, lines: list[bytes]) -> list[Any]:
        """Send each line, read one answer line after each; stop when the host closes."""
        answers: list[Any] = []
        with socket.create_connection(("127.0.0.1", self.host.port), timeout=15) as sock:
            stream = sock.makefile("rwb")
            for line in lines:
                try:
                    stream.write(line + b"\n")
                    stream.flush()
                    reply = stream.readline()
                except OSError:
                    break
                if not reply:
                    break
                # The data connection answers in plain text ("ready" or
                # "refused: ..."): the rest of that socket is QEMU's stream.
                text = reply.decode()
                answers.append(text.strip() if text.startswith("refused: ") else json.loads(text))
        return answers


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    failures = Failures()
    logging.getLogger().addHandler(failures)
    t = Target(tmp_path_factory.mktemp("fuzz"))
    t.failures = failures  # type: ignore[attr-defined]
    try:
        yield t
    finally:
        t.close()
        logging.getLogger().removeHandler(failures)


def check_unharmed(t: Target) -> None:
    answers = t.exchange([json.dumps({"type": "status", "migration_id": "0" * 32}).encode()])
    assert answers == [{"type": "status", "outcome": "unknown"}]
    assert t.cluster.qemus() == {}
    assert t.failures.records == [], [r.getMessage() for r in t.failures.records]  # type: ignore[attr-defined]


def assert_one_line_answers(answers: list[Any]) -> None:
    for answer in answers:
        if isinstance(answer, str):
            assert answer.startswith("refused: ") and "\n" not in answer
            continue
        assert isinstance(answer, dict) and answer.get("type") in ("error", "hello", "status")
        if answer["type"] == "error":
            assert "\n" not in answer["message"]


@FUZZ
@given(message=messages, kind=st.sampled_from(TYPES))
def test_any_first_message(target: Target, message: Any, kind: str) -> None:
    if isinstance(message, dict) and "type" not in message:
        message["type"] = kind
    line = json.dumps(message, allow_nan=True).encode()
    assert_one_line_answers(target.exchange([line]))
    check_unharmed(target)


@FUZZ
@given(message=messages)
def test_any_prepare_after_a_valid_hello(target: Target, message: Any) -> None:
    if isinstance(message, dict):
        message["type"] = "prepare"
    hello = {"type": "hello", "version": PROTOCOL_VERSION, "host": "fuzzer"}
    answers = target.exchange([json.dumps(hello).encode(), json.dumps(message).encode()])
    assert_one_line_answers(answers)
    check_unharmed(target)


@FUZZ
@given(data=st.binary(max_size=300))
def test_any_bytes(target: Target, data: bytes) -> None:
    assert_one_line_answers(target.exchange([data.replace(b"\n", b" ")]))
    check_unharmed(target)


def test_deep_nesting_and_non_json_constants(target: Target) -> None:
    for line in (b"[" * 100_000, b'{"type": "status", "migration_id": NaN}', b"Infinity"):
        answers = target.exchange([line])
        assert len(answers) == 1 and answers[0]["type"] == "error", answers
    check_unharmed(target)
