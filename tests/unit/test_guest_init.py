"""The guest's PID 1 (ferry_init): its pure logic on the host, without root or a guest."""

from __future__ import annotations

import contextlib
import os
import stat
import struct
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from ferry.errors import ImageError
from ferry.guest import image, rootfs
from tests.unit.guest_files import FILES, INIT_PACKAGE, load_init

network = load_init("network")
services = load_init("services")
power_button = load_init("power_button")
console = load_init("console")

CLASSIC_IP = "10.77.0.5::10.77.0.1:255.255.255.0:testguest:eth0:off"


@pytest.fixture(autouse=True)
def console_lines(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[], list[str]]]:
    """The guest's console lines, sent into a pipe: never to the host's /dev/console."""
    # A pipe, not a file: say() opens its console once per line and never seeks.
    rfd, wfd = os.pipe2(os.O_NONBLOCK)
    monkeypatch.setattr(console, "CONSOLE", f"/proc/self/fd/{wfd}")
    seen: list[str] = []

    def lines() -> list[str]:
        with contextlib.suppress(BlockingIOError):
            seen.extend(os.read(rfd, 1 << 16).decode().splitlines())
        return seen

    yield lines
    os.close(rfd)
    os.close(wfd)


# --- the kernel command line -------------------------------------------------


def test_cmdline_words_become_parameters() -> None:
    text = f"root=/dev/vda console=ttyS0 quiet ip={CLASSIC_IP} console=hvc0\n"
    assert network.parse_cmdline(text) == {
        "root": "/dev/vda",
        "console": "hvc0",  # the kernel's rule too: the last one wins
        "quiet": "",
        "ip": CLASSIC_IP,
    }


def test_classic_ip_parameter() -> None:
    conf = network.parse_ip(CLASSIC_IP)
    assert conf == ("10.77.0.5", 24, "10.77.0.1", "testguest", "eth0")
    assert (conf.address, conf.prefix, conf.gateway) == ("10.77.0.5", 24, "10.77.0.1")


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("10.0.0.9:::255.255.0.0:h::off", ("10.0.0.9", 16, "", "h", "eth0")),
        ("10.0.0.9", ("10.0.0.9", 24, "", "", "eth0")),
        ("10.0.0.9::::::", ("10.0.0.9", 24, "", "", "eth0")),
        ("192.168.1.2:10.0.0.1::255.255.255.255::ens3:none", ("192.168.1.2", 32, "", "", "ens3")),
        ("10.1.2.3:::255.0.0.0:a:eth1", ("10.1.2.3", 8, "", "a", "eth1")),
    ],
)
def test_ip_parameter_defaults(value: str, expected: tuple[object, ...]) -> None:
    assert network.parse_ip(value) == expected


@pytest.mark.parametrize("value", ["", "off", "none", "dhcp", "on", "any", "bootp", "rarp", "both"])
def test_ip_autoconfiguration_is_not_a_static_address(value: str) -> None:
    assert network.parse_ip(value) is None
    assert network.parse_ip(f"{value}::10.0.0.1:255.255.255.0:h:eth0:off") is None


def test_a_bad_netmask_is_an_error_not_a_crash() -> None:
    with pytest.raises(ValueError, match=r"netmask '255\.255\.x\.0' is not an IPv4 address"):
        network.parse_ip("10.0.0.9:::255.255.x.0:h:eth0:off")


def test_hosts_file_names_the_guest_on_its_address() -> None:
    assert network.hosts_text("virt_server", "10.0.0.9") == (
        "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n10.0.0.9\tvirt_server\n"
    )
    assert network.hosts_text("h", None).endswith("\n127.0.1.1\th\n")


# --- the service table ---------------------------------------------------------


def _script(path: Path, text: str, mode: int = 0o755) -> None:
    path.write_text(f"#!/bin/sh\n{text}\n")
    path.chmod(mode)


def test_service_table_takes_executables_in_name_order(tmp_path: Path) -> None:
    sdir, logs = tmp_path / "services.d", tmp_path / "log"
    sdir.mkdir()
    _script(sdir / "50-ledger", "exit 0")
    _script(sdir / "40-media", "exit 0")
    _script(sdir / "30-not-executable", "exit 0", mode=0o644)
    _script(sdir / ".10-hidden", "exit 0")
    (sdir / "20-directory").mkdir(mode=0o755)
    table = services.service_table(str(sdir), str(logs))
    assert [(c.name, c.argv, c.log_path) for c in table] == [
        ("40-media", [str(sdir / "40-media")], str(logs / "40-media.log")),
        ("50-ledger", [str(sdir / "50-ledger")], str(logs / "50-ledger.log")),
    ]
    assert logs.is_dir()
    assert services.service_table(str(tmp_path / "missing"), str(logs)) == []


def test_console_getty_needs_the_serial_port_and_agetty(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(services, "SERIAL", str(tmp_path / "ttyS0"))
    monkeypatch.setattr(services, "GETTY", str(tmp_path / "agetty"))
    assert services.console_getty() is None
    (tmp_path / "ttyS0").touch()
    assert services.console_getty() is None
    (tmp_path / "agetty").touch()
    getty = services.console_getty()
    assert getty is not None and getty.log_path is None
    assert getty.argv == [
        str(tmp_path / "agetty"), "--autologin", "root", "--noclear", "--keep-baud",
        "ttyS0", "115200,38400,9600", "vt100",
    ]  # fmt: skip


def test_a_child_that_cannot_start_backs_off_to_30_s(
    console_lines: Callable[[], list[str]],
) -> None:
    child = services.Child("broken", ["/nonexistent/ferry-service"])
    backoffs = []
    for _ in range(7):
        child.start()
        assert child.pid is None
        backoffs.append(child.backoff)
        assert child.next_start == pytest.approx(time.monotonic() + child.backoff, abs=1.0)
    assert backoffs == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
    assert console_lines()[0] == "ferry-guest: cannot start broken: No such file or directory"


def _run_child(child: Any) -> int:  # a ferry_init.services.Child
    child.start()
    assert child.pid is not None
    _, status = os.waitpid(child.pid, 0)
    return status


def test_a_child_logs_and_restarts_with_backoff(
    tmp_path: Path, console_lines: Callable[[], list[str]]
) -> None:
    _script(tmp_path / "svc", "echo out; echo err >&2; exit 3")
    child = services.Child("svc", [str(tmp_path / "svc")], str(tmp_path / "svc.log"))
    child.exited(_run_child(child))
    child.exited(_run_child(child))
    assert (child.pid, child.backoff) == (None, 2.0)
    assert (tmp_path / "svc.log").read_text() == "out\nerr\n" * 2
    assert console_lines() == [
        "ferry-guest: svc exited (status 3); restart in 1 s",
        "ferry-guest: svc exited (status 3); restart in 2 s",
    ]
    # A run longer than STABLE_RUN counts as healthy: the backoff starts over.
    child.started -= services.STABLE_RUN
    child.exited(3 << 8)
    assert child.backoff == services.BACKOFF_FIRST


def test_exit_status_is_described_as_the_console_shows_it() -> None:
    assert services.describe_status(0) == "status 0"
    assert services.describe_status(3 << 8) == "status 3"
    assert services.describe_status(9) == "signal 9"


# --- the power button ------------------------------------------------------------


def _event(kind: int, code: int, value: int) -> bytes:
    return power_button.INPUT_EVENT.pack(1700000000, 5, kind, code, value)  # type: ignore[no-any-return]


def test_input_event_is_the_kernels_24_byte_struct() -> None:
    assert power_button.INPUT_EVENT.size == 24 == struct.calcsize("@llHHi")


def test_only_a_power_key_press_counts() -> None:
    key, power = power_button.EV_KEY, power_button.KEY_POWER
    syn = _event(0, 0, 0)
    assert power_button.pressed_in(_event(key, power, 1) + syn)
    assert power_button.pressed_in(syn + _event(key, 30, 1) + _event(key, power, 1))
    assert not power_button.pressed_in(_event(key, power, 0) + syn)  # release
    assert not power_button.pressed_in(_event(key, power, 2))  # autorepeat
    assert not power_button.pressed_in(_event(key, 30, 1))  # another key
    assert not power_button.pressed_in(_event(4, power, 1))  # EV_MSC, not EV_KEY
    assert not power_button.pressed_in(_event(key, power, 1)[:-1])  # a torn event
    assert not power_button.pressed_in(b"")


def test_power_buttons_are_found_by_their_device_name(tmp_path: Path) -> None:
    sys_input, dev_input = tmp_path / "sys", tmp_path / "dev"
    for name, device in (("event0", "AT Translated Set 2 keyboard"), ("event1", "Power Button")):
        (sys_input / name / "device").mkdir(parents=True)
        (sys_input / name / "device" / "name").write_text(f"{device}\n")
        (dev_input / name).parent.mkdir(exist_ok=True)
        (dev_input / name).write_bytes(_event(power_button.EV_KEY, power_button.KEY_POWER, 1))
    (sys_input / "input3").mkdir()
    fds = power_button.open_power_buttons(str(sys_input), str(dev_input))
    try:
        assert len(fds) == 1
        assert power_button.power_pressed(fds[0])
        assert not power_button.power_pressed(fds[0])  # nothing more to read
    finally:
        for fd in fds:
            os.close(fd)


# --- /sbin/ferry-init, the zipapp ----------------------------------------------


def test_every_module_of_the_package_ships_in_the_image() -> None:
    on_disk = {f"{INIT_PACKAGE}/{p.name}" for p in (FILES / INIT_PACKAGE).glob("*.py")}
    listed = {name for name in image.GUEST_FILES if name.startswith(f"{INIT_PACKAGE}/")}
    assert listed == on_disk


def test_init_zipapp_is_deterministic_and_runs_under_python_isolated(tmp_path: Path) -> None:
    files = image.guest_files()
    data = rootfs.init_zipapp(files)
    assert data == rootfs.init_zipapp(dict(reversed(list(files.items()))))
    assert data.startswith(b"#!/usr/bin/python3 -I\n")
    changed = dict(files, **{"ferry_init/network.py": files["ferry_init/network.py"] + b"\n"})
    assert rootfs.init_zipapp(changed) != data

    app = tmp_path / "ferry-init"
    app.write_bytes(data)
    with zipfile.ZipFile(app) as archive:
        names = archive.namelist()
    assert names == sorted(["__main__.py", *(n for n in image.GUEST_FILES if "/" in n)])
    # Importing every module, then refusing: only the guest's PID 1 may run it.
    proc = subprocess.run(
        [sys.executable, "-I", str(app)], capture_output=True, text=True, timeout=30, check=False
    )
    assert (proc.returncode, proc.stderr) == (1, "ferry-init: must run as PID 1\n")


def test_init_zipapp_needs_the_packages_main() -> None:
    with pytest.raises(ImageError, match=r"no ferry_init/__main__\.py"):
        rootfs.init_zipapp({"ferry_init/__init__.py": b""})


def test_guest_files_land_at_their_guest_paths(tmp_path: Path) -> None:
    files = image.guest_files()
    rootfs.install_guest_files(tmp_path, files)
    init = tmp_path / "sbin" / "ferry-init"
    assert init.read_bytes() == rootfs.init_zipapp(files)
    assert zipfile.is_zipfile(init)
    ledger = tmp_path / "etc" / "ferry" / "services.d" / "50-ledger"
    assert ledger.read_bytes() == files["ferry_ledger.py"]
    for path in (init, ledger):
        assert stat.S_IMODE(path.stat().st_mode) == 0o755
