"""Boot the real guest image under TCG and drive it the way ferry will.

The guest gets a virtio NIC with no host-side peer: it configures eth0 from the
kernel's ip= parameter, while no frame ever leaves QEMU.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from qemu.qmp import QMPClient

from ferry.guest.image import GuestImage, build_image, default_cache_dir, make_domain_disk

pytestmark = pytest.mark.integration

BOOT_TIMEOUT = 120.0
EXIT_TIMEOUT = 60.0
GUEST_IP = "10.77.0.5"
APPEND = f"root=/dev/vda console=ttyS0 ip={GUEST_IP}::10.77.0.1:255.255.255.0:testguest:eth0:off"


@dataclass
class Guest:
    proc: subprocess.Popen[bytes]
    serial: Path
    qmp: Path
    started: float

    def log_text(self) -> str:
        try:
            return self.serial.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def context(self) -> str:
        tail = "\n".join(self.log_text().splitlines()[-25:])
        return f"serial log {self.serial} (kept), last lines:\n{tail}"

    def wait_for(self, marker: str, timeout: float) -> float:
        """Seconds from QEMU start until ``marker`` shows up on the serial console."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if marker in self.log_text():
                return time.monotonic() - self.started
            if self.proc.poll() is not None:
                pytest.fail(
                    f"QEMU exited ({self.proc.returncode}) before {marker!r}; {self.context()}"
                )
            time.sleep(0.1)
        pytest.fail(f"no {marker!r} within {timeout:.0f} s; {self.context()}")

    def wait_exit(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"QEMU did not exit within {timeout:.0f} s; {self.context()}")


@pytest.fixture(scope="session")
def image() -> GuestImage:
    if os.geteuid() != 0:
        pytest.skip("building the guest image needs root")
    cache = Path(os.environ["FERRY_CACHE_DIR"]) if os.environ.get("FERRY_CACHE_DIR") else None
    return build_image(cache or default_cache_dir())


@pytest.fixture
def boot(image: GuestImage, tmp_path: Path) -> Iterator[Callable[[str], Guest]]:
    guests: list[Guest] = []

    def start(append: str) -> Guest:
        disk = tmp_path / "disk.img"
        make_domain_disk(image, disk)
        serial, qmp = tmp_path / "serial.log", tmp_path / "qmp.sock"
        argv = [
            "qemu-system-x86_64", "-accel", "tcg", "-m", "512", "-nodefaults",
            "-display", "none", "-no-user-config",
            "-kernel", str(image.kernel), "-initrd", str(image.initrd), "-append", append,
            "-drive", f"file={disk},if=virtio,format=raw",
            "-device", "virtio-net-pci,mac=52:54:00:77:00:05",
            "-serial", f"file:{serial}",
            "-qmp", f"unix:{qmp},server=on,wait=off",
        ]  # fmt: skip
        with (tmp_path / "qemu.log").open("wb") as qlog:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=qlog, stderr=qlog)
        guest = Guest(proc, serial, qmp, time.monotonic())
        guests.append(guest)
        return guest

    yield start

    # Kill by PID and reap whatever a failed test left running. Serial logs stay in
    # tmp_path (pytest keeps recent ones) and are quoted in every assertion message;
    # only the 1 GiB disk copy goes.
    for guest in guests:
        if guest.proc.poll() is None:
            guest.proc.kill()
        guest.proc.wait()
    (tmp_path / "disk.img").unlink(missing_ok=True)


async def _qmp(socket_path: Path, command: str) -> None:
    client = QMPClient("ferry-test")
    await client.connect(str(socket_path))
    try:
        await client.execute(command)
    finally:
        await client.disconnect()


def test_boot_network_and_acpi_powerdown(boot: Callable[[str], Guest]) -> None:
    guest = boot(APPEND)
    reached = guest.wait_for("ferry-guest: userspace reached", BOOT_TIMEOUT)
    guest.wait_for(f"ferry-guest: network up {GUEST_IP} on eth0", BOOT_TIMEOUT)
    print(f"userspace reached {reached:.1f} s after QEMU start (TCG)")

    asyncio.run(asyncio.wait_for(_qmp(guest.qmp, "system_powerdown"), 10))
    assert guest.wait_exit(EXIT_TIMEOUT) == 0, guest.context()
    assert "ferry-guest: power off" in guest.log_text(), guest.context()


def test_probe_prints_marker_and_powers_off(boot: Callable[[str], Guest]) -> None:
    guest = boot("console=ttyS0 ferry.probe=1")
    assert guest.wait_exit(EXIT_TIMEOUT) == 0, guest.context()
    lines = [line.strip() for line in guest.log_text().splitlines()]
    assert "FERRY-PROBE-OK" in lines, guest.context()
