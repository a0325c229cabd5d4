"""Attach the terminal to a domain's serial console; Ctrl-] detaches."""

from __future__ import annotations

import contextlib
import os
import selectors
import socket
import sys
import termios
import tty
from collections.abc import Iterator
from pathlib import Path

from ferry.errors import FerryError

DETACH = b"\x1d"  # Ctrl-]


@contextlib.contextmanager
def _raw_terminal(fd: int) -> Iterator[None]:
    if not os.isatty(fd):
        yield
        return
    saved = termios.tcgetattr(fd)
    # TCSANOW: what the user typed while we attached is kept, not flushed.
    tty.setraw(fd, termios.TCSANOW)
    try:
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def attach(socket_path: Path, name: str) -> None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(str(socket_path))
    except OSError as err:
        raise FerryError(f"cannot attach to the console of domain '{name}': {err}") from err
    stdin, stdout = sys.stdin.fileno(), sys.stdout.fileno()
    sel = selectors.DefaultSelector()
    sel.register(sock, selectors.EVENT_READ)
    sel.register(stdin, selectors.EVENT_READ)
    with _raw_terminal(stdin), sock:
        if os.isatty(stdin):
            os.write(stdout, f"Connected to domain '{name}'. Escape character is ^]\r\n".encode())
        while True:
            for key, _ in sel.select():
                if key.fileobj is sock:
                    data = sock.recv(65536)
                    if not data:
                        return
                    os.write(stdout, data)
                else:
                    data = os.read(stdin, 4096)
                    if not data:
                        return
                    if DETACH in data:
                        sock.sendall(data.split(DETACH, 1)[0])
                        return
                    sock.sendall(data)
