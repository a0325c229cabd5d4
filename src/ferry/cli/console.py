"""Attach the terminal to a domain's serial console; Ctrl-] detaches."""

from __future__ import annotations

import contextlib
import os
import selectors
import socket
import ssl
import sys
import termios
import tty
from collections.abc import Iterator

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


def attach(sock: socket.socket, name: str) -> None:
    """Carry the terminal to ``sock`` (a console connection from ferryd) and back."""
    sock.settimeout(None)
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
                    # TLS may hold decrypted bytes that select() cannot see.
                    while isinstance(sock, ssl.SSLSocket) and sock.pending():
                        os.write(stdout, sock.recv(sock.pending()))
                else:
                    data = os.read(stdin, 4096)
                    if not data:
                        return
                    if DETACH in data:
                        sock.sendall(data.split(DETACH, 1)[0])
                        return
                    sock.sendall(data)
