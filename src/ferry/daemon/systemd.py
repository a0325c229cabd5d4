"""ferryd under systemd: readiness and watchdog (``sd_notify``), and logs for the journal.

Nothing here is needed off systemd: with no ``$NOTIFY_SOCKET`` every call is
a no-op. The protocol is one datagram per message on a unix socket (a
leading ``@`` names an abstract one), as ``sd_notify(3)`` describes; the
standard library is enough, so ferry takes no libsystemd binding.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import logging.handlers
import os
import socket
import sys
from pathlib import Path

from ferry.util.tasks import spawn

log = logging.getLogger("ferryd")

# The journal reads a "<N>" prefix on each line of a service's stderr as its
# syslog priority, and stamps the time itself.
_PRIORITY = {
    logging.DEBUG: 7,
    logging.INFO: 6,
    logging.WARNING: 4,
    logging.ERROR: 3,
    logging.CRITICAL: 2,
}
TEXT_FORMAT = "%(asctime)s ferryd[%(process)d] %(levelname)s %(message)s"


class Notifier:
    """Tells systemd how ferryd is: READY, STATUS, STOPPING, and the watchdog's pings."""

    def __init__(self, environ: dict[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self.address = env.get("NOTIFY_SOCKET", "")
        if self.address.startswith("@"):
            self.address = "\0" + self.address[1:]
        # The watchdog is meant for us only if its PID is ours (or unset).
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        mine = not pid or pid == str(os.getpid())
        self.watchdog_s = int(usec) / 1e6 if usec.isdigit() and mine else 0.0
        self._pinging: asyncio.Task[None] | None = None

    @property
    def enabled(self) -> bool:
        return bool(self.address)

    def send(self, *fields: str) -> None:
        if not self.address:
            return
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            try:
                sock.sendto("\n".join(fields).encode(), self.address)
            except OSError as err:
                # systemd gone or restarting: ferryd runs on regardless.
                log.debug("sd_notify %s: %s", fields, err)

    def ready(self, status: str) -> None:
        self.send("READY=1", f"STATUS={status}")
        if self.watchdog_s and self._pinging is None:
            self._pinging = spawn(self._ping(), "systemd watchdog")

    def stopping(self, status: str) -> None:
        self.send("STOPPING=1", f"STATUS={status}")

    async def _ping(self) -> None:
        # From the event loop itself: a loop that hangs stops pinging, and
        # systemd restarts ferryd, which re-attaches to the QEMUs.
        while True:
            self.send("WATCHDOG=1")
            await asyncio.sleep(self.watchdog_s / 3)

    async def close(self) -> None:
        if self._pinging is not None:
            self._pinging.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._pinging


class JournalFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        level = _PRIORITY.get(record.levelno, 6)
        text = super().format(record)
        return "\n".join(f"<{level}>{line}" for line in text.splitlines())


def stderr_is_journal(environ: dict[str, str] | None = None) -> bool:
    """systemd connected stderr to the journal (``$JOURNAL_STREAM`` names it)."""
    env = os.environ if environ is None else environ
    device, _, inode = env.get("JOURNAL_STREAM", "").partition(":")
    try:
        st = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError):
        return False
    return f"{st.st_dev}:{st.st_ino}" == f"{device}:{inode}"


def setup_logging(verbose: bool, log_file: Path | None) -> None:
    """The journal when systemd gave us one, else stderr; and ``log_file`` if asked.

    The file is reopened when logrotate has moved it away (WatchedFileHandler),
    so logrotate needs no ``copytruncate`` and no signal to ferryd.
    """
    handlers: list[logging.Handler] = []
    stream = logging.StreamHandler(sys.stderr)
    if stderr_is_journal():
        stream.setFormatter(JournalFormatter("%(message)s"))
    else:
        stream.setFormatter(logging.Formatter(TEXT_FORMAT))
    handlers.append(stream)
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        to_file = logging.handlers.WatchedFileHandler(log_file)
        to_file.setFormatter(logging.Formatter(TEXT_FORMAT))
        handlers.append(to_file)
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, handlers=handlers)
