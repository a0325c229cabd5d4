"""The fake QEMU's migration stream (see fake_qemu.py): the bytes, the faults, post-copy.

Run as part of the fake QEMU's script: its directory is on sys.path.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import stat
import struct
import sys
import threading
import time
from pathlib import Path
from typing import Any

from fake_qemu_tls import tls_wrap

RAM_BYTES = 1 << 20
MAGIC = b"FAKEQEMU"
END = b"FAKE-END"
CHUNK = 16 * 1024

Machine = Any  # fake_qemu.Machine: that script is __main__, not importable here


class FileChannel:
    """A regular file given as the stream (``ferry save``/``restore``), as a socket's calls."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def sendall(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self.fd, view) :]

    def recv(self, size: int) -> bytes:
        return os.read(self.fd, size)

    def setblocking(self, flag: bool) -> None:
        pass

    def shutdown(self, how: int) -> None:
        pass

    def close(self) -> None:
        os.close(self.fd)


def channel_of(fd: int) -> Any:
    """QEMU's fd: takes a socket, a pipe or a file alike."""
    return FileChannel(fd) if stat.S_ISREG(os.fstat(fd).st_mode) else socket.socket(fileno=fd)


def load_plan(role: str) -> dict[str, Any]:
    """This side's part (``source`` or ``target``) of the test's plan."""
    path = os.environ.get("FAKE_QEMU_PLAN")
    if not path or not Path(path).exists():
        return {}
    data = json.loads(Path(path).read_text()).get(role, {})
    return data if isinstance(data, dict) else {}


def released() -> bool:
    path = os.environ.get("FAKE_QEMU_PLAN", "")
    return Path(path + ".release").exists()


def send_stream(machine: Machine, fd: int) -> None:
    plan = machine.plan
    rate = float(plan.get("rate", 0))
    hold_at = plan.get("hold_at")
    sock = channel_of(fd)
    sock.setblocking(True)
    started = time.monotonic()
    machine.mig.update({"transferred": 0, "remaining": RAM_BYTES, "start": started})
    try:
        sock = tls_wrap(machine, sock)
        with machine.lock:
            machine.set_mig("active")
            image = bytes(machine.ram)
        sock.sendall(MAGIC + struct.pack("<Q", len(image)))
        sent = 0
        while sent < len(image):
            if machine.cancel.is_set():
                raise InterruptedError
            if hold_at is not None and sent >= int(hold_at) and not released():
                time.sleep(0.01)
                continue
            piece = image[sent : sent + CHUNK]
            sock.sendall(piece)
            sent += len(piece)
            machine.mig.update({"transferred": sent, "remaining": len(image) - sent})
            if rate:
                time.sleep(len(piece) / rate)
        postcopy = machine.caps.get("postcopy-ram", False)
        if postcopy:
            machine.mig["dirty-sync-count"] = 2
            wait_for(machine, machine.start_postcopy)
        # The final copy: the VM stops, its last state goes out.
        stop_at = time.monotonic()
        with machine.lock:
            machine.set_status("finish-migrate")
            final = bytes(machine.ram)
        if machine.caps.get("pause-before-switchover"):
            with machine.lock:
                machine.set_mig("pre-switchover")
            wait_for(machine, machine.proceed)
            if postcopy:
                with machine.lock:
                    machine.set_mig("postcopy-active")
        sock.sendall(MAGIC + struct.pack("<Q", len(final)) + final)
        sock.sendall(hashlib.sha256(final).digest())
        if postcopy:
            if plan.get("break_after_switch"):
                time.sleep(0.2)  # the target loads its device state, then the link dies
                sock.shutdown(socket.SHUT_RDWR)
                with machine.lock:
                    machine.set_mig("postcopy-paused")
                return
            sock.sendall(END)
        sock.shutdown(socket.SHUT_WR)
        with machine.lock:
            machine.status = "postmigrate"
            machine.mig["downtime"] = int((time.monotonic() - stop_at) * 1000)
            machine.mig["transferred"] = sent + len(final)
            machine.mig["remaining"] = 0
            machine.set_mig("completed")
    except (OSError, InterruptedError) as err:
        with machine.lock:
            machine.mig["error-desc"] = str(err) or "cancelled"
            if machine.mig["status"] == "pre-switchover":
                machine.status = "postmigrate"  # QEMU 7.2 does not run it again itself
            elif machine.status == "finish-migrate":
                machine.set_status("running")
            machine.set_mig("cancelled" if machine.cancel.is_set() else "failed")
    finally:
        sock.close()


def wait_for(machine: Machine, event: threading.Event) -> None:
    while not event.is_set():
        if machine.cancel.is_set():
            raise InterruptedError
        time.sleep(0.005)


def recv_exact(sock: socket.socket, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        chunk = sock.recv(min(size - len(data), 1 << 16))
        if not chunk:
            raise EOFError(f"stream ended after {len(data)} of {size} bytes")
        data += chunk
    return bytes(data)


def receive_stream(machine: Machine, fd: int) -> None:
    sock = channel_of(fd)
    sock.setblocking(True)
    machine.mig.update({"transferred": 0, "remaining": RAM_BYTES})
    try:
        sock = tls_wrap(machine, sock)
        with machine.lock:
            machine.set_mig("active")
        for _ in range(2):  # the live copy, then the final one
            head = recv_exact(sock, len(MAGIC) + 8)
            if head[: len(MAGIC)] != MAGIC:
                raise EOFError("bad stream header")
            (size,) = struct.unpack("<Q", head[len(MAGIC) :])
            image = recv_exact(sock, size)
            machine.mig["transferred"] = machine.mig.get("transferred", 0) + size
        if recv_exact(sock, 32) != hashlib.sha256(image).digest():
            raise EOFError("stream checksum mismatch")
        if machine.caps.get("postcopy-ram"):
            with machine.lock:
                machine.ram[:] = image
                machine.status = "paused"  # the device state is in: it may run now
                machine.set_mig("postcopy-active")
            try:
                if recv_exact(sock, len(END)) == END:
                    with machine.lock:
                        machine.set_mig("completed")
                    return
            except (OSError, EOFError):
                pass
            with machine.lock:
                machine.set_mig("postcopy-paused")  # as QEMU: it waits for a recovery
            return
        while machine.plan.get("hold_complete") and not released():
            time.sleep(0.01)
        with machine.lock:
            machine.ram[:] = image
            machine.status = "paused"
            machine.set_mig("completed")
    except (OSError, EOFError) as err:
        # As QEMU does: a failed incoming migration ends the process.
        with machine.lock:
            machine.set_mig("failed")
        print(f"fake-qemu: load of migration failed: {err}", file=sys.stderr, flush=True)
        os._exit(1)
    finally:
        sock.close()
