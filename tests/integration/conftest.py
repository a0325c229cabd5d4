"""Fixtures that start real things (namespaces, ferryd, QEMU) and clean all of it up.

The ladder: ``host`` (a namespace with bridge xenbr0 and a ferryd) ->
``booted`` (virt_server created there and answering on its IP) ->
``migrated`` (virt_server just live-migrated, to the same host, and answering
again). ``vm`` runs a test against both rungs: a VM that has booted, and one
that has just been migrated. A failed
test's logs are copied to ``test-logs/<test>/`` in the repository.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import shutil
import signal
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from ferry.errors import FerryError, WaitTimeout
from ferry.guest.image import GuestImage, build_image, default_cache_dir, make_domain_disk
from ferry.hypervisor import process
from ferry.lab import netns
from ferry.lab.ferryd_process import FerrydProcess
from ferry.lab.pki import host_bundle
from ferry.pki.ca import CertificateAuthority
from ferry.util.wait import wait_until_sync

REPO = Path(__file__).resolve().parents[2]
KEPT_LOGS = REPO / "test-logs"
BRIDGE_ADDRESS = "10.99.0.1/24"
_counter = itertools.count(1)

XM_TEMPLATE = """\
name = "{name}"
memory = 256
vcpus = 1
kernel = "ferry"
disk = [ "tap:aio:{disk},xvda,w" ]
vif = [ "mac={mac},bridge={bridge}" ]
ip = "{ip}"
netmask = "255.255.255.0"
"""


@pytest.fixture(scope="session", autouse=True)
def _reap_orphans() -> None:
    # QEMUs outlive a ferryd that a test kills; as subreaper we collect them.
    process.become_subreaper()


@pytest.fixture(scope="session")
def guest_image() -> GuestImage:
    cache = Path(os.environ.get("FERRY_CACHE_DIR", str(default_cache_dir())))
    return build_image(cache, log=print)


@pytest.fixture
def workdir(request: pytest.FixtureRequest) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="ferry-t", dir="/tmp"))
    yield path
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        dest = KEPT_LOGS / re.sub(r"[^\w.-]+", "_", request.node.nodeid)
        shutil.rmtree(dest, ignore_errors=True)
        shutil.copytree(path, dest, ignore=shutil.ignore_patterns("*.img", "*.sock"))
        print(f"logs of the failed test kept in {dest}")
    shutil.rmtree(path, ignore_errors=True)


@dataclass
class LabHost:
    ns: str
    ferryd: FerrydProcess
    storage: Path
    workdir: Path
    image: GuestImage

    def domain_config(
        self, name: str = "virt_server", ip: str = "10.99.0.10", bridge: str = "xenbr0",
        mac: str = "00:16:3e:4a:21:07",
    ) -> Path:  # fmt: skip
        disk = self.storage / f"{name}.img"
        if not disk.exists():
            make_domain_disk(self.image, disk)
        path = self.workdir / name
        path.write_text(XM_TEMPLATE.format(name=name, disk=disk, mac=mac, bridge=bridge, ip=ip))
        return path

    def ferry(self, *args: str) -> tuple[int, str, str]:
        result = self.ferryd.ferry(*args)
        return result.returncode, result.stdout, result.stderr

    def ping(self, address: str, timeout: float = 1.0) -> bool:
        return netns.ping(self.ns, address, timeout)

    def qemu_pids(self) -> list[int]:
        pids = []
        for pidfile in (self.ferryd.run_dir / "domains").glob("*/qemu.pid"):
            pid = process.read_pidfile(pidfile)
            if pid is not None and process.is_alive(pid):
                pids.append(pid)
        return pids

    def stray_qemus(self) -> list[int]:
        """QEMUs started for this test, found by its unique directory in their
        command line: even one whose pidfile a failing ferryd removed."""
        marker = str(self.workdir).encode()
        return [
            pid
            for pid, argv in process.processes(marker).items()
            if argv[0].startswith(b"qemu-system")
        ]


def _cleanup_host(host: LabHost, known_pids: list[int]) -> None:
    if host.ferryd.proc is not None and host.ferryd.proc.poll() is None:
        with contextlib.suppress(FerryError):
            for row in host.ferryd.call("list"):
                with contextlib.suppress(FerryError):
                    host.ferryd.call("destroy", name=row["name"])
    host.ferryd.stop()
    for pid in set(known_pids) | set(host.qemu_pids()) | set(host.stray_qemus()):
        if process.is_alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(WaitTimeout):
            wait_until_sync(lambda p=pid: not process.is_alive(p), timeout=10, what=f"{pid} to end")
        process.reap(pid)
    netns.remove(host.ns)
    shutil.rmtree(host.ferryd.run_dir, ignore_errors=True)


@pytest.fixture
def host(workdir: Path, guest_image: GuestImage) -> Iterator[LabHost]:
    ns = f"ferry-t{os.getpid()}-{next(_counter)}"
    netns.create(ns)
    netns.add_bridge(ns, "xenbr0", BRIDGE_ADDRESS)
    storage = workdir / "xen"
    storage.mkdir()
    config = workdir / "ferryd.toml"
    # Its certificate names it, localhost and 127.0.0.1: it migrates to itself.
    ca = CertificateAuthority.init(workdir / "ca")
    pki = host_bundle(ca, "xen_host_1", BRIDGE_ADDRESS.split("/")[0], workdir / "pki")
    config.write_text(f'storage_roots = ["{storage}"]\naccel = "tcg"\npki_dir = "{pki}"\n')
    ferryd = FerrydProcess(
        name="xen_host_1", state_dir=workdir / "state", run_dir=workdir / "run",
        log=workdir / "ferryd.log", ns=ns, config=config,
    )  # fmt: skip
    lab = LabHost(ns=ns, ferryd=ferryd, storage=storage, workdir=workdir, image=guest_image)
    known: list[int] = []
    try:
        ferryd.start()
        yield lab
    finally:
        known += lab.qemu_pids()
        _cleanup_host(lab, known)


def wait_for(check: Callable[[], bool], timeout: float, what: str) -> float:
    """Wait on a state (never a fixed sleep); the seconds it took."""
    start = time.monotonic()
    wait_until_sync(check, timeout=timeout, interval=0.1, what=what)
    return time.monotonic() - start


@pytest.fixture
def booted(host: LabHost) -> LabHost:
    """virt_server created on ``host`` and answering on 10.99.0.10."""
    code, _out, err = host.ferry("create", str(host.domain_config()))
    assert code == 0, err
    wait_for(lambda: host.ping("10.99.0.10"), 180, "virt_server to answer ping")
    return host


@pytest.fixture
def migrated(booted: LabHost) -> LabHost:
    """virt_server just live-migrated (to its own host: the one-host ladder's peer)."""
    before = booted.qemu_pids()
    code, _out, err = booted.ferry("migrate", "-l", "virt_server", "localhost")
    assert code == 0, err
    # The source's QEMU quits just after the commit: wait for the new one alone.
    wait_for(
        lambda: len(now := booted.qemu_pids()) == 1 and now != before,
        60,
        "the migrated QEMU to be the only one",
    )
    wait_for(lambda: booted.ping("10.99.0.10"), 60, "virt_server to answer after migrating")
    return booted


@pytest.fixture(params=["booted", "migrated"])
def vm(request: pytest.FixtureRequest) -> LabHost:
    """virt_server as booted, then (second run) as just migrated."""
    host: LabHost = request.getfixturevalue(request.param)
    return host
