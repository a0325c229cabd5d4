"""``ferry demo`` (foundation): one host, one guest, shown answering on the network.

It builds (or reuses) the guest image, makes a host in a network namespace
with the classic bridge ``xenbr0``, runs a ``ferryd`` there, creates
``virt_server`` from an xm config like the classic ``/etc/xen/virt_server``,
and shows the guest answering, stopping to answer while paused, and
answering again, before shutting it down through ACPI. Everything it made is
removed at the end, also on Ctrl-C.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from ferry.errors import FerryError
from ferry.guest.image import build_image, make_domain_disk
from ferry.lab import netns
from ferry.lab.ferryd_process import FerrydProcess

HOST_NS = "ferry-demo-host"
BRIDGE_ADDRESS = "10.99.0.1/24"
GUEST_IP = "10.99.0.10"

XM_CONFIG = """\
# Like the classic /etc/xen/virt_server, with the disk on this demo's storage.
name = "virt_server"
uuid = "6f2a8c1e-3b1d-4c2e-9a57-1d2e3f4a5b6c"
maxmem = 512
memory = 512
vcpus = 1
bootloader = "/usr/bin/pygrub"
on_poweroff = "destroy"
on_reboot = "restart"
on_crash = "restart"
sdl = 1
disk = [ "tap:aio:{disk},xvda,w" ]
vif = [ "mac=00:16:3e:4a:21:07,bridge=xenbr0" ]
ip = "{ip}"
netmask = "255.255.255.0"
"""


@dataclass
class DemoPaths:
    root: Path

    @property
    def storage(self) -> Path:
        return self.root / "xen"

    @property
    def state(self) -> Path:
        return self.root / "state"

    @property
    def run(self) -> Path:
        return Path("/run/ferry-demo")


def wait_until(check: Callable[[], bool], timeout: float) -> float | None:
    """Seconds until ``check()`` held, or None if it never did within ``timeout``."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if check():
            return time.monotonic() - start
        time.sleep(0.1)  # a failed check may return at once (no route yet)
    return None


def run_demo(workdir: Path, keep: bool = False) -> int:
    out = Console(highlight=False)
    paths = DemoPaths(workdir)
    out.rule("ferry demo: one host, one guest")
    image = build_image(log=lambda line: out.print(f"  [dim]{line}[/]"))
    out.print(f"guest image ready: kernel {image.kernel_version}")

    ferryd: FerrydProcess | None = None
    try:
        shutil.rmtree(paths.root, ignore_errors=True)
        shutil.rmtree(paths.run, ignore_errors=True)
        paths.storage.mkdir(parents=True)
        netns.create(HOST_NS)
        netns.add_bridge(HOST_NS, "xenbr0", BRIDGE_ADDRESS)
        out.print(f"host namespace {HOST_NS} with bridge xenbr0 ({BRIDGE_ADDRESS})")

        host_cfg = paths.root / "ferryd.toml"
        host_cfg.write_text(f'storage_roots = ["{paths.storage}"]\n')
        ferryd = FerrydProcess(
            name="xen_host_1", state_dir=paths.state, run_dir=paths.run,
            log=paths.root / "ferryd.log", ns=HOST_NS, config=host_cfg,
        )  # fmt: skip
        ferryd.start()
        out.print(f"ferryd running (log {ferryd.log})")

        disk = paths.storage / "virt_server.img"
        make_domain_disk(image, disk)
        config = paths.root / "virt_server"
        config.write_text(XM_CONFIG.format(disk=disk, ip=GUEST_IP))

        out.print("\n$ ferry create virt_server")
        start = time.monotonic()
        result = ferryd.ferry("create", str(config))
        out.print(result.stdout.strip() or result.stderr.strip())
        if result.returncode != 0:
            raise FerryError(f"ferry create failed: {result.stderr.strip()}")
        for line in result.stderr.strip().splitlines():
            out.print(f"  [dim]{line}[/]")
        answered = wait_until(lambda: netns.ping(HOST_NS, GUEST_IP), 180)
        if answered is None:
            raise FerryError(f"virt_server did not answer on {GUEST_IP} within 180 s")
        out.print(
            f"virt_server answers on {GUEST_IP}, "
            f"{time.monotonic() - start:.1f} s after `ferry create`"
        )
        out.print("\n$ ferry list\n" + ferryd.ferry("list").stdout)

        out.print("$ ferry pause virt_server")
        ferryd.ferry("pause", "virt_server")
        silent = not netns.ping(HOST_NS, GUEST_IP, timeout=2)
        out.print(f"  paused: {'no answer, as expected' if silent else 'still answering?!'}")
        out.print("$ ferry unpause virt_server")
        ferryd.ferry("unpause", "virt_server")
        again = wait_until(lambda: netns.ping(HOST_NS, GUEST_IP), 30)
        out.print(f"  unpaused: {'answers again' if again is not None else 'no answer?!'}")

        out.print("\n$ ferry shutdown -w virt_server")
        result = ferryd.ferry("shutdown", "-w", "virt_server")
        out.print(result.stdout.strip() or result.stderr.strip())
        ok = silent and again is not None and result.returncode == 0
        out.rule("[green]demo succeeded[/]" if ok else "[red]demo failed[/]")
        return 0 if ok else 1
    finally:
        if not keep:
            _teardown(ferryd, paths)


def _teardown(ferryd: FerrydProcess | None, paths: DemoPaths) -> None:
    if ferryd is not None and ferryd.proc is not None and ferryd.proc.poll() is None:
        try:
            for row in ferryd.call("list"):
                ferryd.call("destroy", name=row["name"])
        except FerryError:
            pass  # the daemon is unwell; the namespace removal below still ends its taps
        ferryd.stop()
    netns.remove(HOST_NS)
    shutil.rmtree(paths.run, ignore_errors=True)
