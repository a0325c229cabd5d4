#!/usr/bin/python3 -I
"""ferry's guest write workload (port 8891): dirties RAM, or the disk, at a chosen rate,
for migration tests.

POST /start?rate_mib=R&wss_mib=W  writes R MiB/s of whole 4 KiB pages, round-robin over a
                                  working set of W MiB, until stopped (a new start replaces it)
            [&disk=1]             the working set is a file on the guest's disk instead
                                  (/var/lib/ferry-dirty/dirty.bin), each pacing step's pages
                                  written through to the disk (fdatasync) before the next
POST /stop                        stops writing; the working set is freed
GET  /status                      {"running", "rate_mib", "wss_mib", "pages", "mib_s"}:
                                  ``pages`` counts pages written since the start, so a
                                  reader sees whether the workload progresses or is stalled,
                                  and ``mib_s`` is the rate over the last second

Each page gets bytes cut from a 16 MiB random pool at a moving offset: neither zstd nor
XBZRLE can shrink what it sends, so the rate on the wire is the rate asked.

The guest runs this file as /etc/ferry/services.d/60-dirty with Debian's python3 and the
standard library only; it never imports ``ferry``.
"""

from __future__ import annotations

import collections
import json
import mmap
import os
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

PORT = 8891
PAGE = 4096
MIB = 1 << 20
# Random bytes that pages are cut from. zstd finds repeats only within its window
# (512 KiB to 8 MiB at the levels QEMU uses): a 16 MiB pool, cut at a stride that
# is not a page multiple, gives pages no compressor can shrink.
POOL = 16 * MIB
STRIDE = PAGE + 64
SLICE_S = 0.01  # pacing step
MAX_WSS_MIB = 4096


DISK_FILE = "/var/lib/ferry-dirty/dirty.bin"


class Workload:
    def __init__(self, rate_mib: float, wss_mib: int, disk: bool = False) -> None:
        self.rate_mib = rate_mib
        self.wss_mib = wss_mib
        self.disk = disk
        self.pages = 0
        self.stopping = threading.Event()
        # (time, pages) every pacing step over the last second or so, for the rate.
        self.window: collections.deque[tuple[float, int]] = collections.deque(maxlen=128)
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        if self.disk:
            os.makedirs(os.path.dirname(DISK_FILE), exist_ok=True)
            fd = os.open(DISK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                os.ftruncate(fd, self.wss_mib * MIB)
                self.pace(
                    lambda index, page: os.pwrite(fd, page, index * PAGE),
                    lambda: os.fdatasync(fd),
                )
            finally:
                os.close(fd)
            return
        memory = mmap.mmap(-1, self.wss_mib * MIB)
        view = memoryview(memory)

        def put(index: int, page: bytes) -> None:
            view[index * PAGE : (index + 1) * PAGE] = page

        try:
            self.pace(put, lambda: None)
        finally:
            view.release()
            memory.close()

    def pace(self, put: Callable[[int, bytes], object], flush: Callable[[], object]) -> None:
        """``put`` each page at the rate asked, ``flush`` after each pacing step."""
        pool = os.urandom(POOL + PAGE)
        count = self.wss_mib * MIB // PAGE
        index = 0
        per_slice = self.rate_mib * MIB / PAGE * SLICE_S
        owed = 0.0
        started = time.monotonic()
        next_slice = started
        while not self.stopping.is_set():
            owed += per_slice
            while owed >= 1:
                offset = (self.pages * STRIDE) % POOL
                put(index, pool[offset : offset + PAGE])
                index = (index + 1) % count
                self.pages += 1
                owed -= 1
            flush()
            self.window.append((time.monotonic(), self.pages))
            next_slice += SLICE_S
            delay = next_slice - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            else:
                # Behind (a throttled or paused vCPU, a slow disk): never burst to catch up.
                next_slice = time.monotonic()
                owed = min(owed, per_slice)

    def status(self) -> dict[str, object]:
        now = time.monotonic()
        recent = [(t, p) for t, p in list(self.window) if now - t <= 1.0] or [(now, self.pages)]
        first_t, first_p = recent[0]
        rate = (self.pages - first_p) * PAGE / MIB / (now - first_t) if now > first_t else 0.0
        return {
            "running": self.thread.is_alive(),
            "rate_mib": self.rate_mib,
            "wss_mib": self.wss_mib,
            "disk": self.disk,
            "pages": self.pages,
            "mib_s": round(rate, 2),
        }


class State:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.workload: Workload | None = None

    def start(self, rate_mib: float, wss_mib: int, disk: bool = False) -> Workload:
        with self.lock:
            self.stop_locked()
            self.workload = Workload(rate_mib, wss_mib, disk)
            self.workload.thread.start()
            return self.workload

    def stop_locked(self) -> None:
        if self.workload is not None:
            self.workload.stopping.set()
            self.workload.thread.join()
            self.workload = None

    def status(self) -> dict[str, object]:
        with self.lock:
            if self.workload is None:
                return {"running": False, "rate_mib": 0, "wss_mib": 0, "pages": 0, "mib_s": 0}
            return self.workload.status()


def parse_start(query: str) -> tuple[float, int, bool]:
    """``rate_mib``, ``wss_mib`` and ``disk`` from a query string; ValueError with the reason."""
    args = parse_qs(query)
    disk = args.get("disk", ["0"])[0]
    if disk not in ("0", "1"):
        raise ValueError("disk must be 0 or 1")
    try:
        rate = float(args.get("rate_mib", ["8"])[0])
        wss = int(args.get("wss_mib", ["64"])[0])
    except ValueError:
        raise ValueError("rate_mib and wss_mib must be numbers") from None
    if not 0 < rate <= 10_000:
        raise ValueError("rate_mib must be in (0, 10000]")
    if not 1 <= wss <= MAX_WSS_MIB:
        raise ValueError(f"wss_mib must be in 1..{MAX_WSS_MIB}")
    return rate, wss, disk == "1"


class Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], state: State) -> None:
        super().__init__(address, Handler)
        self.state = state


class Handler(BaseHTTPRequestHandler):
    server: Server

    def _send(self, code: int, body: dict[str, object]) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        if urlsplit(self.path).path == "/status":
            self._send(200, self.server.state.status())
        else:
            self._send(404, {"error": "not found"})

    def do_POST(self) -> None:
        url = urlsplit(self.path)
        if url.path == "/start":
            try:
                rate, wss, disk = parse_start(url.query)
            except ValueError as err:
                self._send(400, {"error": str(err)})
                return
            self.server.state.start(rate, wss, disk)
            self._send(200, self.server.state.status())
        elif url.path == "/stop":
            with self.server.state.lock:
                self.server.state.stop_locked()
            self._send(200, self.server.state.status())
        else:
            self._send(404, {"error": "not found"})

    def log_message(self, format: str, *args: object) -> None:
        pass


def main() -> None:
    Server(("0.0.0.0", PORT), State()).serve_forever()


if __name__ == "__main__":
    main()
