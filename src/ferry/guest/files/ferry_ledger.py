#!/usr/bin/python3 -I
"""ferry's guest witness (port 8890): proves a VM was not rebooted and lost no write.

GET  /status  {"boot_id", "uptime", "counter", "records", "hostname"}: the counter ticks in
              memory every 100 ms, so it continues across a migration and
              restarts from 0 only if the guest reboots.
POST /append  appends the next numbered record to the ledger, fsyncs it, and
              only then answers with its number: an answered record is an
              acknowledged write, which no failure may lose or double.
GET  /ledger  the ledger as written on the disk.

The guest runs this file as /etc/ferry/services.d/50-ledger with Debian's
python3 and the standard library only; it never imports ``ferry``.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

LEDGER = "/var/lib/ferry-ledger/ledger"
BOOT_ID = "/proc/sys/kernel/random/boot_id"
PORT = 8890
TICK = 0.1


def last_record(path: str) -> int:
    """The number of the ledger's last record; 0 for an empty or missing ledger."""
    if not os.path.exists(path):
        return 0
    with open(path) as f:
        lines = [line for line in f.read().splitlines() if line.strip()]
    return int(lines[-1]) if lines else 0


class Ledger:
    """Records on the disk, one decimal number a line, numbered on from the last one there."""

    def __init__(self, path: str) -> None:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        self.path = path
        self.lock = threading.Lock()
        self.last = last_record(path)

    def append(self) -> int:
        """Write and fsync the next record; its number, once it is on the disk."""
        with self.lock:
            number = self.last + 1
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, f"{number}\n".encode())
                os.fsync(fd)
            finally:
                os.close(fd)
            self.last = number
            return number

    def read(self) -> bytes:
        try:
            with open(self.path, "rb") as f:
                return f.read()
        except FileNotFoundError:
            return b""


class State:
    def __init__(self, ledger: Ledger, boot_id: str) -> None:
        self.ledger = ledger
        self.boot_id = boot_id
        self.counter = 0

    def tick(self) -> None:
        while True:
            time.sleep(TICK)
            self.counter += 1

    def status(self) -> dict[str, object]:
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return {
            "boot_id": self.boot_id,
            "uptime": uptime,
            "counter": self.counter,
            "records": self.ledger.last,
            "hostname": socket.gethostname(),
        }


class WitnessServer(ThreadingHTTPServer):
    daemon_threads = True  # a client that hangs must not hold the service at exit

    def __init__(self, address: tuple[str, int], state: State) -> None:
        super().__init__(address, Handler)
        self.state = state


class Handler(BaseHTTPRequestHandler):
    server: WitnessServer

    def _send(self, body: bytes, kind: str = "application/json") -> None:
        self.send_response(200)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        if self.path == "/status":
            self._send(json.dumps(self.server.state.status()).encode())
        elif self.path == "/ledger":
            self._send(self.server.state.ledger.read(), "text/plain")
        else:
            self.send_error(404)

    def do_POST(self) -> None:
        if self.path != "/append":
            self.send_error(404)
            return
        self._send(json.dumps({"record": self.server.state.ledger.append()}).encode())

    def log_message(self, format: str, *args: object) -> None:
        pass


def main() -> None:
    ledger = Ledger(LEDGER)
    with open(BOOT_ID) as f:
        state = State(ledger, f.read().strip())
    threading.Thread(target=state.tick, daemon=True).start()
    WitnessServer(("0.0.0.0", PORT), state).serve_forever()


if __name__ == "__main__":
    main()
