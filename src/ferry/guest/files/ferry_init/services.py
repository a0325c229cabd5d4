"""The service table: each executable in /etc/ferry/services.d, and the console getty.

Every child is restarted when it exits, after a backoff that doubles from 1 s to
30 s while it keeps failing, so that a broken service cannot spin the CPU.
"""

from __future__ import annotations

import os
import time

from .console import say
from .system import ENV

SERVICES_DIR = "/etc/ferry/services.d"
LOG_DIR = "/var/log/ferry"
BACKOFF_FIRST = 1.0
BACKOFF_MAX = 30.0
STABLE_RUN = 10.0  # a child that ran this long restarts after the first backoff again
GETTY = "/sbin/agetty"
SERIAL = "/dev/ttyS0"

SpawnAction = tuple[int, int, str, int, int] | tuple[int, int, int]


class Child:
    """A supervised process: a service or the console getty, restarted with backoff."""

    def __init__(self, name: str, argv: list[str], log_path: str | None = None) -> None:
        self.name = name
        self.argv = argv
        self.log_path = log_path
        self.pid: int | None = None
        self.started = 0.0
        self.backoff = 0.0
        self.next_start = 0.0

    def start(self) -> None:
        actions: list[SpawnAction] = [(os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0)]
        if self.log_path:
            flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND
            actions.append((os.POSIX_SPAWN_OPEN, 1, self.log_path, flags, 0o644))
        else:
            actions.append((os.POSIX_SPAWN_OPEN, 1, "/dev/null", os.O_WRONLY, 0))
        actions.append((os.POSIX_SPAWN_DUP2, 1, 2))
        try:
            self.pid = os.posix_spawn(
                self.argv[0], self.argv, ENV, file_actions=actions, setsid=True
            )
        except OSError as err:
            say(f"cannot start {self.name}: {err.strerror}")
            self.pid = None
            self._schedule_restart()
            return
        self.started = time.monotonic()

    def exited(self, status: int) -> None:
        self.pid = None
        ran = time.monotonic() - self.started
        if ran >= STABLE_RUN:
            self.backoff = 0.0
        self._schedule_restart()
        say(f"{self.name} exited ({describe_status(status)}); restart in {self.backoff:.0f} s")

    def _schedule_restart(self) -> None:
        self.backoff = min(BACKOFF_MAX, self.backoff * 2 or BACKOFF_FIRST)
        self.next_start = time.monotonic() + self.backoff


def describe_status(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"signal {os.WTERMSIG(status)}"
    return f"status {os.WEXITSTATUS(status)}"


def service_table(services_dir: str = SERVICES_DIR, log_dir: str = LOG_DIR) -> list[Child]:
    """One child per executable file in ``services_dir``, in name order, logging to ``log_dir``."""
    try:
        names = sorted(os.listdir(services_dir))
    except OSError:
        names = []
    os.makedirs(log_dir, exist_ok=True)
    children = []
    for name in names:
        path = os.path.join(services_dir, name)
        if os.path.isfile(path) and os.access(path, os.X_OK) and not name.startswith("."):
            children.append(Child(name, [path], os.path.join(log_dir, f"{name}.log")))
    return children


def console_getty() -> Child | None:
    """A root shell on the serial console, if the guest has both the port and agetty."""
    if not (os.path.exists(SERIAL) and os.path.exists(GETTY)):
        return None
    getty = [GETTY, "--autologin", "root", "--noclear", "--keep-baud"]
    return Child("console", [*getty, os.path.basename(SERIAL), "115200,38400,9600", "vt100"])


def discover_children() -> list[Child]:
    children = service_table()
    getty = console_getty()
    if getty is not None:
        children.append(getty)
    return children
