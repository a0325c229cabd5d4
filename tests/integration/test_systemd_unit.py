"""The shipped unit (contrib/systemd/ferryd.service) under a real systemd.

Type=notify: ``systemctl start`` returns once ferryd answers. KillMode=process:
``systemctl stop`` ends ferryd and leaves its VM running, and the next start
re-attaches to it. The watchdog: a ferryd whose event loop stops is ended by
systemd and started again, and the VM is re-attached again.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from ferry.guest.image import GuestImage, default_cache_dir, make_domain_disk
from ferry.lab import netns
from ferry.util.wait import wait_until_sync

from .conftest import BRIDGE_ADDRESS, XM_TEMPLATE
from .systemd_support import SYSTEMD, Systemd, running_systemd, unit_dir

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not SYSTEMD.exists(), reason="no systemd binary here"),
]


class Host:
    def __init__(self, systemd: Systemd, workdir: Path) -> None:
        self.systemd = systemd
        self.socket = workdir / "run" / "ferryd.sock"
        self.run_dir = workdir / "run"

    def ferry(self, *args: str) -> tuple[int, str, str]:
        argv = [sys.executable, "-m", "ferry.cli.main", "--connect", str(self.socket), *args]
        result = self.systemd.run(argv)
        return result.returncode, result.stdout, result.stderr

    def listed(self) -> dict[str, str]:
        code, out, err = self.ferry("list", "--json")
        assert code == 0, err
        return {row["name"]: row["state"] for row in json.loads(out)}

    def qemu_pid(self) -> int:
        (pidfile,) = (self.run_dir / "domains").glob("*/qemu.pid")
        return int(pidfile.read_text())

    def alive(self, pid: int) -> bool:
        # PIDs of systemd's namespace: ask inside it.
        return self.systemd.run(["kill", "-0", str(pid)]).returncode == 0


@pytest.fixture
def host(workdir: Path, guest_image: GuestImage) -> Iterator[Host]:
    ns = f"ferry-sd{os.getpid()}"
    netns.create(ns)
    try:
        netns.add_bridge(ns, "xenbr0", BRIDGE_ADDRESS)
        storage = workdir / "xen"
        storage.mkdir()
        config = workdir / "ferryd.toml"
        config.write_text(
            f'name = "xen_host_1"\nstorage_roots = ["{storage}"]\naccel = "tcg"\n'
            f'state_dir = "{workdir / "state"}"\nrun_dir = "{workdir / "run"}"\n'
            "insecure = true\n"  # TLS is not what this test is about
        )
        argv = [sys.executable, "-m", "ferry.daemon.main", "--config", str(config),
                "--image-cache", str(default_cache_dir()),
                "--log-file", str(workdir / "ferryd-file.log")]  # fmt: skip
        # The watchdog made short, so that the test sees it act (not so short
        # that a loaded CI machine's stall looks like a hang).
        units = unit_dir(workdir / "units", argv, workdir / "ferryd.log",
                         WatchdogSec="10", TimeoutAbortSec="3")  # fmt: skip
        with running_systemd(ns, units, workdir / "systemd.log") as systemd:
            h = Host(systemd, workdir)
            disk = storage / "virt_server.img"
            make_domain_disk(guest_image, disk)
            line = dict(name="virt_server", disk=disk, mac="00:16:3e:4a:21:07", bridge="xenbr0")
            (workdir / "virt_server").write_text(XM_TEMPLATE.format(**line, ip="10.99.0.10"))
            yield h
    finally:
        netns.remove(ns)


def test_the_unit_starts_stops_and_restarts_ferryd_leaving_the_vm_alone(
    host: Host, workdir: Path
) -> None:
    sd = host.systemd
    started = sd.systemctl("start", "ferryd.service")
    assert started.returncode == 0, started.stderr + (workdir / "ferryd.log").read_text()
    # Type=notify: start returned after READY=1, so ferryd answers at once.
    assert sd.show("ferryd.service", "ActiveState") == "active"
    assert "re-attached" in sd.show("ferryd.service", "StatusText")
    code, _out, err = host.ferry("create", str(workdir / "virt_server"))
    assert code == 0, err
    qemu = host.qemu_pid()
    assert host.listed() == {"virt_server": "running"}

    stopped = sd.systemctl("stop", "ferryd.service")
    assert stopped.returncode == 0, stopped.stderr
    assert sd.show("ferryd.service", "ActiveState") == "inactive"
    assert host.alive(qemu), "stopping ferryd ended its VM"
    assert host.ferry("list")[0] != 0  # nobody answers: ferryd is gone

    assert sd.systemctl("start", "ferryd.service").returncode == 0
    assert host.listed() == {"virt_server": "running"}
    assert host.qemu_pid() == qemu  # the same QEMU, re-attached

    # The watchdog: a live ferryd pings it (its timestamp moves on)...
    pings: set[str] = set()

    def pinged_twice() -> bool:
        pings.add(sd.show("ferryd.service", "WatchdogTimestampMonotonic"))
        return len(pings) >= 3

    wait_until_sync(pinged_twice, timeout=20, interval=0.2, what="ferryd to ping the watchdog")
    assert sd.show("ferryd.service", "NRestarts") == "0"
    # ... and one that stops answering is ended and started again.
    main = int(sd.show("ferryd.service", "MainPID"))
    assert sd.run(["kill", "-STOP", str(main)]).returncode == 0
    wait_until_sync(
        lambda: sd.show("ferryd.service", "MainPID") not in ("0", str(main))
        and sd.show("ferryd.service", "ActiveState") == "active",
        timeout=40, interval=0.2, what="systemd to restart the hung ferryd",
    )  # fmt: skip
    assert sd.show("ferryd.service", "NRestarts") == "1"
    assert host.listed() == {"virt_server": "running"}
    assert host.qemu_pid() == qemu and host.alive(qemu)
    # The file log is written too (the one logrotate would rotate).
    assert "listening on" in (workdir / "ferryd-file.log").read_text()

    code, _out, err = host.ferry("destroy", "virt_server")
    assert code == 0, err
    assert sd.systemctl("stop", "ferryd.service").returncode == 0
