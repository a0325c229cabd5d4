"""The lab's trust: the station (client_1, admin) and the viewer (client_2) reach the
hosts' control API over mutual TLS; bad, foreign, expired and revoked credentials
and plain peers are refused with one line, and ferryd keeps serving."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

from ferry.lab.lab import Lab
from ferry.pki.credentials import Credentials
from ferry.pki.identity import Role
from tests.integration.lab_fixtures import lab_fixture, lab_workdir  # noqa: F401
from tests.unit.pki_support import TestCA

pytestmark = pytest.mark.integration

PLAIN_REQUEST = (
    "import socket, sys; s = socket.create_connection((sys.argv[1], int(sys.argv[2])), 5); "
    "s.sendall(sys.argv[3].encode() + b'\\n'); print(s.makefile().readline())"
)


def ferry(lab: Lab, node: str, *args: str, pki: Path | None = None) -> tuple[int, str, str]:
    argv = ["ferry", *(["--pki", str(pki)] if pki else []), *args]
    result = lab.run(node, argv, timeout=60)
    return result.returncode, result.stdout, result.stderr


def plain(lab: Lab, node: str, host: str, port: int, line: str) -> dict[str, object]:
    result = lab.run(node, [sys.executable, "-c", PLAIN_REQUEST, host, str(port), line])
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)  # type: ignore[no-any-return]


def serves_the_station(lab: Lab) -> None:
    code, out, err = ferry(lab, "client_1", "--host", "xen_host_1", "list", "--json")
    assert code == 0 and json.loads(out) == [], err


@pytest.mark.parametrize("lab", ["dir"], indirect=True)
def test_station_viewer_and_refusals(lab: Lab, tmp_path: Path) -> None:
    serves_the_station(lab)
    code, out, err = ferry(lab, "client_2", "--host", "xen_host_2", "list")
    assert code == 0 and out.startswith("Name"), err
    # A viewer reads, and changes nothing.
    code, _, err = ferry(
        lab, "client_2", "--host", "xen_host_1", "migrate", "-l", "vm", "xen_host_2"
    )
    assert code == 1 and "viewer client_2 may not 'migrate'" in err, err
    assert err.count("\n") == 1

    pki = lab.workdir / "pki"
    # A certificate of another CA: the station does not even trust the host.
    stranger = TestCA(tmp_path / "stranger").credentials("client_1", Role.ADMIN)
    code, _, err = ferry(lab, "client_1", "--host", "xen_host_1", "list", pki=stranger.dir)
    assert code == 1 and "TLS with ferryd on xen_host_1:8003 failed" in err, err
    # An expired one: refused before anything is sent.
    expired = tmp_path / "expired"
    shutil.copytree(pki / "client_1", expired)
    ca = TestCA.existing(pki / "ca")
    ca.expire(Credentials(expired))
    code, _, err = ferry(lab, "client_1", "--host", "xen_host_1", "list", pki=expired)
    assert code == 1 and "not now" in err, err
    # Plain TCP on either port: one line, no service.
    answer = plain(lab, "client_1", "xen_host_1", 8003, '{"op": "list"}')
    assert answer["ok"] is False and "over TLS only" in str(answer["error"])
    answer = plain(lab, "client_1", "xen_host_1", 8002, '{"type": "hello", "version": 1}')
    assert answer["kind"] == "refused" and "in plain TCP" in str(answer["message"])
    # A revoked viewer, once the host has the new CRL (no restart).
    ca.ca.revoke("client_2")
    shutil.copy(pki / "ca" / "crl.pem", pki / "xen_host_1" / "crl.pem")
    code, _, err = ferry(lab, "client_2", "--host", "xen_host_1", "list")
    assert code == 1 and "client_2" in err and "is revoked" in err, err
    # And through it all, ferryd kept serving.
    serves_the_station(lab)
