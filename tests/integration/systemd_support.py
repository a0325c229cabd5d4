"""A real systemd (Debian's /lib/systemd/systemd) as PID 1 of its own PID and mount
namespaces, inside a network namespace: the shipped ferryd unit runs under it.

Its units come from one directory (``$SYSTEMD_UNIT_PATH``): the unit under
test, the few targets a service's default dependencies name (empty here), and
a drop-in that points ExecStart at this checkout's ferryd. Nothing of the
machine's own units is loaded, so nothing else starts. Killing this systemd
(PID 1 of its namespace) ends every process in the namespace: no QEMU is left.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
from collections.abc import Iterator, Sequence
from pathlib import Path

from ferry.util.wait import wait_until_sync

SYSTEMD = Path("/lib/systemd/systemd")
REPO = Path(__file__).resolve().parents[2]
UNIT = REPO / "contrib" / "systemd" / "ferryd.service"
# What a service's default dependencies and the unit's After=/Wants= name.
TARGETS = ("sysinit", "basic", "shutdown", "network", "network-online", "multi-user",
           "remote-fs", "local-fs", "ferry-test")  # fmt: skip


class Systemd:
    def __init__(self, ns: str, units: Path, log: Path) -> None:
        self.units = units
        argv = [
            "ip", "netns", "exec", ns,
            "unshare", "--pid", "--fork", "--mount", "--mount-proc", "--kill-child",
            "env", f"SYSTEMD_UNIT_PATH={units}", "container=ferry-test",
            str(SYSTEMD), "--system", "--unit=ferry-test.target",
        ]  # fmt: skip
        with log.open("ab") as out:
            self.proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True
            )
        self.pid = 0
        try:
            self.pid = wait_until_sync(self._init_pid, timeout=20, interval=0.05, what="systemd")
            wait_until_sync(
                lambda: self.systemctl("is-system-running").stdout.strip()
                in ("running", "degraded"),
                timeout=30, interval=0.1, what="systemd to be up",
            )  # fmt: skip
        except BaseException:
            self.close()
            raise

    def _init_pid(self) -> int | None:
        """systemd's PID as seen from here: the unshare child running it."""
        for pid in _children(self.proc.pid):
            for child in [pid, *_children(pid)]:
                with contextlib.suppress(OSError):
                    if Path(f"/proc/{child}/exe").resolve() == SYSTEMD.resolve():
                        return child
        return None

    def run(self, argv: Sequence[str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """``argv`` inside systemd's namespaces (its /run, its PIDs)."""
        return subprocess.run(
            ["nsenter", "-t", str(self.pid), "-m", "-p", "-n", *argv],
            capture_output=True, text=True, timeout=timeout,
        )  # fmt: skip

    def systemctl(self, *args: str, timeout: float = 200) -> subprocess.CompletedProcess[str]:
        return self.run(["systemctl", *args], timeout)

    def show(self, unit: str, prop: str) -> str:
        return self.systemctl("show", "-p", prop, "--value", unit).stdout.strip()

    def close(self) -> None:
        # PID 1 of the namespace: its end ends everything in it. Not found:
        # unshare's --kill-child ends it with unshare.
        with contextlib.suppress(ProcessLookupError):
            if self.pid:
                os.kill(self.pid, signal.SIGKILL)
            else:
                os.killpg(self.proc.pid, signal.SIGKILL)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(20)


def _children(pid: int) -> list[int]:
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            found += [int(p) for p in (task / "children").read_text().split()]
    return found


def unit_dir(path: Path, ferryd_argv: Sequence[str], log: Path, **service: str) -> Path:
    """The shipped unit as it is, and a drop-in that runs this checkout's ferryd."""
    path.mkdir(parents=True)
    shutil.copy(UNIT, path / "ferryd.service")
    for target in TARGETS:
        (path / f"{target}.target").write_text(f"[Unit]\nDescription={target} (test)\n")
    dropin = path / "ferryd.service.d"
    dropin.mkdir()
    lines = ["[Service]", "ExecStart=", "ExecStart=" + " ".join(ferryd_argv),
             f"StandardOutput=append:{log}", f"StandardError=append:{log}",
             *(f"{k}={v}" for k, v in service.items())]  # fmt: skip
    (dropin / "test.conf").write_text("\n".join(lines) + "\n")
    return path


@contextlib.contextmanager
def running_systemd(ns: str, units: Path, log: Path) -> Iterator[Systemd]:
    systemd = Systemd(ns, units, log)
    try:
        yield systemd
    finally:
        systemd.close()
