"""The guest's witness service (ferry_ledger.py): the ledger and its HTTP face, on the host."""

from __future__ import annotations

import http.client
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.unit.guest_files import load_ledger

witness = load_ledger()
BOOT_ID = "0b6a2c1e-2f5d-4a8e-9d1c-7f3e5a9b8c40"


@pytest.mark.parametrize(
    ("text", "last"),
    [("", 0), ("\n\n", 0), ("1\n", 1), ("1\n2\n3\n", 3), ("1\n2\n\n  \n", 2)],
)
def test_numbering_goes_on_from_the_last_record_on_disk(
    tmp_path: Path, text: str, last: int
) -> None:
    path = tmp_path / "ledger"
    path.write_text(text)
    assert witness.last_record(str(path)) == last
    assert witness.Ledger(str(path)).append() == last + 1


def test_records_are_numbered_lines_and_survive_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "var" / "lib" / "ferry-ledger" / "ledger"
    ledger = witness.Ledger(str(path))  # creates its directory
    assert (ledger.last, ledger.read()) == (0, b"")
    assert [ledger.append() for _ in range(3)] == [1, 2, 3]
    assert path.read_bytes() == b"1\n2\n3\n" == ledger.read()
    again = witness.Ledger(str(path))
    assert (again.last, again.append()) == (3, 4)
    assert path.read_text().split() == ["1", "2", "3", "4"]


def test_concurrent_appends_never_double_or_skip_a_number(tmp_path: Path) -> None:
    ledger = witness.Ledger(str(tmp_path / "ledger"))
    answers: list[int] = []

    def writer() -> None:
        for _ in range(25):
            answers.append(ledger.append())

    threads = [threading.Thread(target=writer) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(answers) == list(range(1, 201))
    assert [int(x) for x in ledger.read().split()] == list(range(1, 201))


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Any]:
    state = witness.State(witness.Ledger(str(tmp_path / "ledger")), BOOT_ID)
    srv = witness.WitnessServer(("127.0.0.1", 0), state)
    thread = threading.Thread(target=srv.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()
    thread.join()


def _request(srv: Any, method: str, path: str) -> tuple[int, str, bytes]:
    host, port = srv.server_address
    conn = http.client.HTTPConnection(host, port, timeout=10)
    try:
        conn.request(method, path)
        response = conn.getresponse()
        return response.status, response.getheader("Content-Type") or "", response.read()
    finally:
        conn.close()


def test_http_status_append_and_ledger(server: Any) -> None:
    status, kind, body = _request(server, "GET", "/status")
    first = json.loads(body)
    assert (status, kind) == (200, "application/json")
    assert set(first) == {"boot_id", "uptime", "counter", "records", "hostname"}
    assert (first["boot_id"], first["counter"], first["records"]) == (BOOT_ID, 0, 0)
    assert first["uptime"] > 0

    for expected in (1, 2):
        assert _request(server, "POST", "/append")[::2] == (
            200,
            json.dumps({"record": expected}).encode(),
        )
    assert json.loads(_request(server, "GET", "/status")[2])["records"] == 2
    assert _request(server, "GET", "/ledger") == (200, "text/plain", b"1\n2\n")


@pytest.mark.parametrize(("method", "path"), [("GET", "/"), ("GET", "/append"), ("POST", "/x")])
def test_unknown_paths_are_404_and_write_nothing(server: Any, method: str, path: str) -> None:
    assert _request(server, method, path)[0] == 404
    assert server.state.ledger.read() == b""
