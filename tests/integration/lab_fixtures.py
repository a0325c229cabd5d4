"""The ``lab`` fixture: the whole classic set-up (``ferry lab up``), always torn down.

Import ``lab_fixture`` and ``lab_workdir`` from here into the test module.

Parametrize it by storage kind with ``indirect``::

    @pytest.mark.parametrize("lab", ["nfs", "nbd", "dir"], indirect=True)
    def test_x(lab: Lab) -> None: ...

Without a parameter it uses NFS, the classic set-up. A failed test's lab
files (lab.json, ferryd and storage server logs, never the images) are kept
in ``test-logs/<test>/``.
"""

from __future__ import annotations

import re
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from ferry.guest.image import GuestImage
from ferry.lab import lab as lab_mod
from ferry.lab.lab import Lab

REPO = Path(__file__).resolve().parents[2]
KEPT_LOGS = REPO / "test-logs"


def keep_logs(request: pytest.FixtureRequest, workdir: Path, failed: bool = False) -> None:
    """``failed``: the caller saw the test fail (inside the test, before its report)."""
    report = getattr(request.node, "rep_call", None)
    if not (failed or (report is not None and report.failed)) or not workdir.is_dir():
        return
    dest = KEPT_LOGS / re.sub(r"[^\w.-]+", "_", request.node.nodeid)
    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(workdir, dest, ignore=shutil.ignore_patterns("*.img", "*.sock"))
    print(f"logs of the failed test kept in {dest}")


@pytest.fixture
def lab_workdir(request: pytest.FixtureRequest) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="ferrylab-t", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(name="lab")
def lab_fixture(
    request: pytest.FixtureRequest, lab_workdir: Path, guest_image: GuestImage
) -> Iterator[Lab]:
    """A lab that is up, with the storage kind of the parameter (default nfs)."""
    del guest_image  # only to have the image built (once per session) before `up`
    kind = getattr(request, "param", "nfs")
    try:
        yield lab_mod.up(kind, workdir=lab_workdir, log=print)
    finally:
        keep_logs(request, lab_workdir)
        lab_mod.down(lab_workdir, log=print)


METRICS_PORT = 9177  # ferryd's default: each lab host scrapes its own loopback


def scrape_metrics(lab: Lab, host: str) -> str:
    """The host's ferryd metrics, fetched over HTTP inside its namespace."""
    code = (
        "import sys, urllib.request; sys.stdout.write(urllib.request.urlopen("
        f"'http://127.0.0.1:{METRICS_PORT}/metrics', timeout=10).read().decode())"
    )
    result = lab.run(host, [sys.executable, "-c", code], timeout=30)
    assert result.returncode == 0, result.stderr
    return result.stdout
