"""PID 1's loop: start and restart the children, reap every zombie, stop on request.

Signals reach the loop through a wakeup pipe (``signal.set_wakeup_fd``), so one
select() waits at once for a child's exit, a stop signal, the power button and
the next scheduled restart.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import signal
import time
from types import FrameType
from typing import NoReturn

from .console import say
from .power_button import open_power_buttons, power_pressed
from .services import Child
from .system import power_off

STOP_GRACE = 5.0
KILL_GRACE = 2.0
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGPWR)


class Init:
    def __init__(self) -> None:
        self.stop_reason: str | None = None
        self.children: dict[int, Child] = {}
        self.sel = selectors.DefaultSelector()
        rfd, wfd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.wakeup = rfd
        signal.set_wakeup_fd(wfd, warn_on_full_buffer=False)
        self.sel.register(rfd, selectors.EVENT_READ, "wakeup")
        signal.signal(signal.SIGCHLD, lambda *_: None)
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._on_stop_signal)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        # Opened now, before "userspace reached" is said: evdev delivers a
        # press only to descriptors already open, and whoever watches the
        # console may press the button as soon as the guest says it is up
        # (seen: a press right after "network up" was lost, the guest ran on).
        for fd in open_power_buttons():
            self.sel.register(fd, selectors.EVENT_READ, "power")

    def _on_stop_signal(self, signum: int, _frame: FrameType | None) -> None:
        self.stop_reason = self.stop_reason or signal.Signals(signum).name

    def reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            child = self.children.pop(pid, None)
            if child is not None and self.stop_reason is None:
                child.exited(status)

    def run(self, children: list[Child]) -> NoReturn:
        while self.stop_reason is None:
            self.reap()
            now = time.monotonic()
            for child in children:
                if child.pid is None and child.next_start <= now:
                    child.start()
                    if child.pid is not None:
                        self.children[child.pid] = child
            # A SIGCHLD or stop signal after reap() still wakes select() via the wakeup fd.
            restarts = [c.next_start for c in children if c.pid is None]
            timeout = max(0.0, min(restarts) - now) if restarts else None
            for key, _ in self.sel.select(timeout):
                if key.data == "wakeup":
                    self._drain()
                elif power_pressed(key.fd):
                    self.stop_reason = self.stop_reason or "power button"
        self.shutdown()

    def _drain(self) -> None:
        try:
            while os.read(self.wakeup, 512):
                pass
        except BlockingIOError:
            pass

    def _wait_all(self, deadline: float) -> bool:
        """Reap until no process but us is left or the deadline passes."""
        while time.monotonic() < deadline:
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return True
            if pid == 0:
                self.sel.select(min(0.1, max(0.0, deadline - time.monotonic())))
                self._drain()
        return False

    def shutdown(self) -> NoReturn:
        say(f"shutting down ({self.stop_reason})")
        # kill(-1) reaches every process but PID 1, including orphans of services.
        with contextlib.suppress(OSError):
            os.kill(-1, signal.SIGTERM)
        if not self._wait_all(time.monotonic() + STOP_GRACE):
            say(f"processes left after {STOP_GRACE:.0f} s; killing them")
            with contextlib.suppress(OSError):
                os.kill(-1, signal.SIGKILL)
            self._wait_all(time.monotonic() + KILL_GRACE)
        power_off()
