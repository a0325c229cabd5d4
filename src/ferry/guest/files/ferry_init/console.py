"""The console marker lines the host's tests and tools wait for."""

from __future__ import annotations

import os

# Read at each call rather than bound at import, so that host-side tests can redirect it.
CONSOLE = "/dev/console"


def say(line: str) -> None:
    """One line on the console; opened per line so a getty's vhangup cannot take it away."""
    data = f"ferry-guest: {line}\n".encode()
    fd: int | None
    try:
        fd = os.open(CONSOLE, os.O_WRONLY | os.O_NOCTTY)
    except OSError:
        fd = None
    try:
        os.write(fd if fd is not None else 1, data)
    except OSError:
        pass
    finally:
        if fd is not None:
            os.close(fd)
