#!/usr/bin/python3
"""ferry-media-server: the HTTP media streaming server that runs inside the guest.

It does gnump3d's job: browse a media tree, stream files, hand out ``.m3u``
playlists, keep an access log and play statistics. It must run on the guest's
Debian Python with the standard library only, so this file imports nothing from
ferry; it is copied into the guest as ``/usr/local/bin/ferry-media-server``.

URL space (everything under ``--root``)::

    /dir/                       directory page (HTML), links to playlists
    /dir/file.ogg               the file; GET and HEAD; single byte ranges
    /dir/file.ogg?m3u           playlist holding that one file
    /dir/?m3u                   playlist of the directory, recursive
    /dir/?m3u=shuffle           the same, shuffled
    /_stats                     statistics page (``?format=json`` for JSON)
    /_search?q=WORD             files and directories whose name contains WORD

Pacing. A live broadcast cannot be downloaded faster than it is played; a file
server can, and then a player holds the whole movie after a second and no outage
of the server is ever visible to it. So media files are sent at their real-time
byte rate (size / duration) times ``--pace``, after an initial burst of
``--burst`` seconds of media that lets a player fill its start-up buffer quickly,
as real streaming servers do. A Range request (a player resuming) starts a new
burst at its offset. The duration comes from the manifest ``<file>.json`` beside
the file (key ``duration``), else from the Ogg file itself (the last granule
position of its Vorbis or Opus stream), else from ``--fallback-kbps``. Data is
written in chunks of at most 8 KiB, about 20 per second, so that a player's
progress is fine-grained. ``--pace 0`` disables pacing.

Concurrency. One thread per connection; a client that sends nothing is dropped
after ``--idle-timeout`` seconds, one that reads nothing after
``--send-timeout`` seconds, and neither holds up any other client. At most
``--max-clients`` connections are served at once; more get a 503.
"""

from __future__ import annotations

import argparse
import contextlib
import html
import ipaddress
import json
import mimetypes
import os
import random
import signal
import socket
import struct
import sys
import threading
import time
import urllib.parse
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, BinaryIO

SERVER_NAME = "ferry-media-server/1"
DESCRIPTION = "HTTP media streaming server with paced delivery (gnump3d's job)"
CHUNK_MAX = 8192
# Pacing aims at roughly this many writes per second, so progress stays smooth.
WRITES_PER_SECOND = 20
MANIFEST_SUFFIX = ".json"

MEDIA_TYPES: dict[str, str] = {
    ".ogg": "video/ogg",
    ".ogv": "video/ogg",
    ".oga": "audio/ogg",
    ".opus": "audio/ogg",
    ".spx": "audio/ogg",
    ".mp3": "audio/mpeg",
    ".flac": "audio/flac",
    ".wav": "audio/wav",
    ".webm": "video/webm",
    ".mkv": "video/x-matroska",
    ".mka": "audio/x-matroska",
    ".mp4": "video/mp4",
    ".m4v": "video/mp4",
    ".m4a": "audio/mp4",
    ".aac": "audio/aac",
    ".wma": "audio/x-ms-wma",
    ".avi": "video/x-msvideo",
    ".mpg": "video/mpeg",
    ".mpeg": "video/mpeg",
    ".ts": "video/mp2t",
    ".m3u": "audio/x-mpegurl",
    ".m3u8": "application/vnd.apple.mpegurl",
    ".pls": "audio/x-scpls",
    ".json": "application/json",
    ".txt": "text/plain; charset=utf-8",
    ".html": "text/html; charset=utf-8",
    ".jpg": "image/jpeg",
    ".png": "image/png",
}


def media_type(path: str) -> str:
    ext = os.path.splitext(path)[1].lower()
    if ext in MEDIA_TYPES:
        return MEDIA_TYPES[ext]
    guessed, _ = mimetypes.guess_type(path)
    return guessed or "application/octet-stream"


def is_streamable(path: str) -> bool:
    """Audio and video are paced and counted as plays; everything else is not."""
    kind = media_type(path)
    return kind.startswith(("audio/", "video/")) and not kind.startswith("audio/x-mpegurl")


# --------------------------------------------------------------------------- config


@dataclass
class Config:
    root: Path = Path("/home/mp3")
    bind: str = "0.0.0.0"
    port: int = 8888
    pace: float = 1.0
    burst: float = 2.0
    fallback_kbps: float = 400.0
    allow: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = field(default_factory=list)
    deny: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = field(default_factory=list)
    access_log: str | None = None
    stats_file: Path | None = None
    idle_timeout: float = 20.0
    send_timeout: float = 60.0
    max_clients: int = 256


def client_allowed(config: Config, host: str) -> bool:
    """Denied networks win; a non-empty allow list admits only its networks."""
    try:
        addr = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    if any(addr in net for net in config.deny):
        return False
    return not config.allow or any(addr in net for net in config.allow)


# --------------------------------------------------------------------------- duration


def _ogg_pages(data: bytes) -> list[tuple[int, int, bytes]]:
    """(granule, serial, first packet bytes) of each complete page in ``data``."""
    pages: list[tuple[int, int, bytes]] = []
    pos = data.find(b"OggS")
    while pos >= 0 and pos + 27 <= len(data):
        granule, serial = struct.unpack_from("<qI", data, pos + 6)
        nseg = data[pos + 26]
        lacing = data[pos + 27 : pos + 27 + nseg]
        body_start = pos + 27 + nseg
        body_len = sum(lacing)
        if len(lacing) < nseg or body_start + body_len > len(data):
            pos = data.find(b"OggS", pos + 4)
            continue
        pages.append((granule, serial, data[body_start : body_start + min(body_len, 64)]))
        pos = data.find(b"OggS", body_start + body_len)
    return pages


def ogg_duration(path: Path) -> float | None:
    """Duration of an Ogg file from its audio stream's last granule position.

    Vorbis and Opus granules count samples, so the last one divided by the
    sample rate is the length; Theora's are keyframe-encoded and not used.
    """
    try:
        with path.open("rb") as f:
            head = f.read(65536)
            size = f.seek(0, os.SEEK_END)
            f.seek(max(0, size - 262144))
            tail = f.read()
    except OSError:
        return None
    rates: dict[int, tuple[int, int]] = {}  # serial -> (sample rate, pre-skip)
    for _granule, serial, packet in _ogg_pages(head):
        if packet.startswith(b"\x01vorbis") and len(packet) >= 16:
            rates[serial] = (struct.unpack_from("<I", packet, 12)[0], 0)
        elif packet.startswith(b"OpusHead") and len(packet) >= 12:
            rates[serial] = (48000, struct.unpack_from("<H", packet, 10)[0])
    last: dict[int, int] = {}
    for granule, serial, _packet in _ogg_pages(tail):
        if serial in rates and granule >= 0:
            last[serial] = granule
    for serial, granule in last.items():
        rate, pre_skip = rates[serial]
        if rate > 0 and granule > pre_skip:
            return (granule - pre_skip) / rate
    return None


def manifest_duration(path: Path) -> float | None:
    manifest = path.with_name(path.name + MANIFEST_SUFFIX)
    try:
        data = json.loads(manifest.read_text(encoding="utf-8"))
        duration = float(data["duration"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return duration if duration > 0 else None


class DurationCache:
    """Durations per (path, size, mtime), so a file is parsed once, not per request."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._cache: dict[tuple[str, int, int], float | None] = {}

    def get(self, path: Path, st: os.stat_result) -> float | None:
        key = (str(path), st.st_size, st.st_mtime_ns)
        with self._lock:
            if key in self._cache:
                return self._cache[key]
        duration = manifest_duration(path)
        if duration is None and path.suffix.lower() in (".ogg", ".ogv", ".oga", ".opus"):
            duration = ogg_duration(path)
        with self._lock:
            self._cache[key] = duration
        return duration


# --------------------------------------------------------------------------- pacing


class Pacer:
    """Token bucket: ``burst`` bytes at once, then ``rate`` bytes per second."""

    def __init__(self, rate: float, burst: float) -> None:
        self.rate = rate
        self.burst = burst
        self.start = time.monotonic()
        self.sent = 0

    def chunk_size(self) -> int:
        if self.rate <= 0:
            return CHUNK_MAX * 8
        return max(512, min(CHUNK_MAX, int(self.rate / WRITES_PER_SECOND)))

    def wait(self, nbytes: int) -> None:
        """Block until ``nbytes`` more may be sent."""
        if self.rate <= 0:
            return
        due = self.start + (self.sent + nbytes - self.burst) / self.rate
        delay = due - time.monotonic()
        if delay > 0:
            time.sleep(delay)

    def sent_bytes(self, nbytes: int) -> None:
        self.sent += nbytes


# --------------------------------------------------------------------------- ranges


class Unsatisfiable(Exception):
    pass


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """The inclusive (first, last) byte range asked for, or None to send it all.

    Syntactically invalid headers and multi-range requests are ignored, which
    RFC 9110 allows; a valid single range that selects nothing raises
    :class:`Unsatisfiable`.
    """
    if header is None:
        return None
    unit, sep, spec = header.strip().partition("=")
    if not sep or unit.strip().lower() != "bytes" or "," in spec:
        return None
    first_s, dash, last_s = spec.strip().partition("-")
    first_s, last_s = first_s.strip(), last_s.strip()
    if not dash or not (first_s or last_s):
        return None
    if not all(part.isdigit() for part in (first_s, last_s) if part):
        return None
    if not first_s:
        suffix = int(last_s)
        if suffix == 0 or size == 0:
            raise Unsatisfiable
        return max(0, size - suffix), size - 1
    first = int(first_s)
    last = int(last_s) if last_s else None
    if last is not None and last < first:
        return None
    if first >= size:
        raise Unsatisfiable
    if last is None:
        last = size - 1
    return first, min(last, size - 1)


# --------------------------------------------------------------------------- stats


class Stats:
    """Plays per file and the most recent plays, optionally persisted as JSON."""

    RECENT = 50

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._lock = threading.Lock()
        self.counts: Counter[str] = Counter()
        self.recent: deque[dict[str, Any]] = deque(maxlen=self.RECENT)
        self.requests = 0
        self.bytes_sent = 0
        self.started = time.time()
        if path is not None:
            self._load(path)

    def _load(self, path: Path) -> None:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            self.counts.update({str(k): int(v) for k, v in data.get("counts", {}).items()})
            for item in data.get("recent", [])[-self.RECENT :]:
                self.recent.append(dict(item))
        except (OSError, ValueError, TypeError, AttributeError):
            # A missing or damaged stats file must not keep the server from starting.
            pass

    def request(self, nbytes: int) -> None:
        with self._lock:
            self.requests += 1
            self.bytes_sent += nbytes

    def play(self, path: str, client: str) -> None:
        with self._lock:
            self.counts[path] += 1
            self.recent.append({"time": time.time(), "client": client, "path": path})
            snapshot = self._snapshot_locked()
        self._save(snapshot)

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return self._snapshot_locked()

    def _snapshot_locked(self) -> dict[str, Any]:
        return {
            "started": self.started,
            "requests": self.requests,
            "bytes_sent": self.bytes_sent,
            "counts": dict(self.counts),
            "most_played": self.counts.most_common(20),
            "recent": list(reversed(self.recent)),
        }

    def _save(self, snapshot: dict[str, Any]) -> None:
        if self.path is None:
            return
        tmp = self.path.with_name(f".{self.path.name}.{threading.get_ident()}.tmp")
        try:
            tmp.write_text(json.dumps(snapshot), encoding="utf-8")
            os.replace(tmp, self.path)
        except OSError as err:
            print(f"ferry-media-server: cannot save stats to {self.path}: {err}", file=sys.stderr)


# --------------------------------------------------------------------------- server


class MediaServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128
    allow_reuse_address = True

    def __init__(self, config: Config) -> None:
        self.config = config
        self.root = config.root.resolve()
        self.durations = DurationCache()
        self.stats = Stats(config.stats_file)
        self.slots = threading.BoundedSemaphore(config.max_clients)
        self._log_lock = threading.Lock()
        self._log: Any = None
        if config.access_log == "-":
            self._log = sys.stdout
        elif config.access_log:
            self._log = open(config.access_log, "a", encoding="utf-8", buffering=1)  # noqa: SIM115
        if ":" in config.bind:
            self.address_family = socket.AF_INET6
        super().__init__((config.bind, config.port), MediaHandler)

    def address(self) -> str:
        """``host:port`` actually listened on (the port may have been 0)."""
        host, port = self.socket.getsockname()[:2]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    def log_line(self, line: str) -> None:
        if self._log is None:
            return
        with self._log_lock:
            self._log.write(line + "\n")
            self._log.flush()

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self.slots.acquire(blocking=False):
            # Refusing fast keeps a flood of connections from starving served clients.
            with contextlib.suppress(OSError):
                request.sendall(
                    b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n"
                    b"Connection: close\r\n\r\n"
                )
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except Exception:
            self.slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        err = sys.exc_info()[1]
        if isinstance(err, OSError):
            # Clients vanish mid-request all the time; that is no server fault.
            return
        print(
            f"ferry-media-server: error serving {client_address[0]}: {err!r}",
            file=sys.stderr,
            flush=True,
        )

    def server_close(self) -> None:
        super().server_close()
        if self._log is not None and self._log is not sys.stdout:
            self._log.close()


class MediaHandler(BaseHTTPRequestHandler):
    server: MediaServer
    server_version = SERVER_NAME
    sys_version = ""
    protocol_version = "HTTP/1.1"

    # Error replies to unparsable request lines must still carry a status line,
    # which the stdlib omits when it takes the request for HTTP/0.9.
    default_request_version = "HTTP/1.0"

    def parse_request(self) -> bool:
        if not super().parse_request():
            return False
        if len(self.requestline.split()) < 3:
            self.send_error(HTTPStatus.BAD_REQUEST, "HTTP/0.9 requests are not supported")
            return False
        return True

    def version_string(self) -> str:
        return SERVER_NAME

    def setup(self) -> None:
        super().setup()
        # Reading a request line or headers: a silent client is dropped after this.
        self.connection.settimeout(self.server.config.idle_timeout)
        if self.connection.family in (socket.AF_INET, socket.AF_INET6):
            # Paced writes are small; Nagle would hold them back for the peer's delayed ACK.
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._sent = 0
        self._status = 0

    # ---------------------------------------------------------------- logging

    def log_message(self, format: str, *args: Any) -> None:
        # The stdlib's own messages (timeouts, bad requests) are not access log lines.
        pass

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        self._status = int(code) if str(code).isdigit() else 0

    def _access_log(self) -> None:
        request = getattr(self, "requestline", "") or "-"
        stamp = time.strftime("%d/%b/%Y:%H:%M:%S %z", time.localtime())
        request = request.replace("\\", "\\\\").replace('"', '\\"')
        status = self._status or "-"
        self.server.log_line(
            f'{self.client_address[0]} - - [{stamp}] "{request}" {status} {self._sent}'
        )
        self.server.stats.request(self._sent)

    def handle_one_request(self) -> None:
        self._sent = 0
        self._status = 0
        self.requestline = ""
        super().handle_one_request()
        if self.requestline:
            self._access_log()

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        self._status = code
        super().send_error(code, message, explain)
        if code >= 400:
            self.close_connection = True

    # ---------------------------------------------------------------- dispatch

    def do_GET(self) -> None:
        self._dispatch(head=False)

    def do_HEAD(self) -> None:
        self._dispatch(head=True)

    def _dispatch(self, head: bool) -> None:
        if not client_allowed(self.server.config, self.client_address[0]):
            self.send_error(HTTPStatus.FORBIDDEN, "Client not allowed")
            return
        target = self.path
        if not target.startswith("/"):
            parts = urllib.parse.urlsplit(target)
            if parts.scheme not in ("http", "https") or not parts.path.startswith("/"):
                self.send_error(HTTPStatus.BAD_REQUEST, "Bad request target")
                return
            target = parts.path + ("?" + parts.query if parts.query else "")
        raw_path, _, query_s = target.partition("?")
        query = urllib.parse.parse_qs(query_s, keep_blank_values=True)
        if raw_path == "/_stats":
            self._stats_page(head, query)
            return
        if raw_path == "/_search":
            self._search_page(head, query)
            return
        path = self._resolve(raw_path)
        if path is None:
            return
        if path.is_dir():
            if not raw_path.endswith("/"):
                self._redirect(raw_path + "/" + ("?" + query_s if query_s else ""))
            elif "m3u" in query:
                shuffle = query["m3u"][-1] == "shuffle"
                self._playlist(head, self._walk_media(path), shuffle, path.name or "root")
            else:
                self._directory_page(head, path, raw_path)
        elif path.is_file():
            if "m3u" in query:
                self._playlist(head, [path], False, path.stem)
            else:
                self._send_file(head, path)
        else:
            self.send_error(HTTPStatus.NOT_FOUND, "Not found")

    def _resolve(self, raw_path: str) -> Path | None:
        """The file system path under the root, or None after sending a refusal."""
        try:
            decoded = urllib.parse.unquote(raw_path, errors="strict")
        except UnicodeDecodeError:
            self.send_error(HTTPStatus.BAD_REQUEST, "Bad path encoding")
            return None
        if "\x00" in decoded or "\\" in decoded:
            self.send_error(HTTPStatus.BAD_REQUEST, "Bad path")
            return None
        parts = [p for p in decoded.split("/") if p not in ("", ".")]
        if ".." in parts:
            self.send_error(HTTPStatus.FORBIDDEN, "Path outside the media root")
            return None
        root = self.server.root
        try:
            real = root.joinpath(*parts).resolve()
        except (OSError, RuntimeError):
            self.send_error(HTTPStatus.NOT_FOUND, "Not found")
            return None
        # Symbolic links may point anywhere; only their targets inside the root are served.
        if real != root and root not in real.parents:
            self.send_error(HTTPStatus.FORBIDDEN, "Path outside the media root")
            return None
        if not real.exists():
            self.send_error(HTTPStatus.NOT_FOUND, "Not found")
            return None
        return real

    def _url_for(self, path: Path) -> str:
        rel = path.relative_to(self.server.root).as_posix()
        quoted = urllib.parse.quote("/" + rel if rel != "." else "/")
        return quoted + ("/" if path.is_dir() and not quoted.endswith("/") else "")

    def _absolute_url(self, path: Path) -> str:
        host = self.headers.get("Host")
        if not host or any(c in host for c in " /\\\r\n"):
            host = self.server.address()
        return f"http://{host}{self._url_for(path)}"

    def _walk_media(self, top: Path) -> list[Path]:
        found: list[Path] = []
        root = self.server.root
        for dirpath, dirnames, filenames in os.walk(top, followlinks=False):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for name in sorted(filenames):
                full = Path(dirpath, name)
                real = full.resolve()
                if is_streamable(name) and (root in real.parents) and real.is_file():
                    found.append(full)
        return found

    # ---------------------------------------------------------------- responses

    def _send_body(self, head: bool, status: int, ctype: str, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()
        if not head:
            self.wfile.write(body)
            self._sent += len(body)

    def _redirect(self, location: str) -> None:
        self.send_response(HTTPStatus.MOVED_PERMANENTLY)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _page(self, head: bool, title: str, body: str) -> None:
        doc = (
            "<!DOCTYPE html>\n<html><head><meta charset='utf-8'>"
            f"<title>{html.escape(title)}</title></head><body>\n"
            f"<h1>{html.escape(title)}</h1>\n{body}\n"
            "<hr><p><a href='/'>home</a> | <a href='/_stats'>statistics</a> | "
            "<form style='display:inline' action='/_search'>"
            "<input name='q' placeholder='search'></form></p>\n</body></html>\n"
        )
        self._send_body(head, HTTPStatus.OK, "text/html; charset=utf-8", doc.encode())

    def _directory_page(self, head: bool, path: Path, raw_path: str) -> None:
        try:
            entries = sorted(p for p in path.iterdir() if not p.name.startswith("."))
        except OSError:
            self.send_error(HTTPStatus.FORBIDDEN, "Cannot list directory")
            return
        rows = ["<p><a href='?m3u'>play all</a> | <a href='?m3u=shuffle'>shuffle all</a></p><ul>"]
        if path != self.server.root:
            rows.append("<li><a href='../'>../</a></li>")
        for entry in entries:
            try:
                is_dir = entry.is_dir()
                size = 0 if is_dir else entry.stat().st_size
            except OSError:
                continue
            href = html.escape(urllib.parse.quote(entry.name) + ("/" if is_dir else ""), True)
            label = html.escape(entry.name + ("/" if is_dir else ""))
            extra = ""
            if is_dir:
                extra = f" [<a href='{href}?m3u'>play</a>]"
            elif is_streamable(entry.name):
                extra = f" {size} bytes [<a href='{href}?m3u'>play</a>]"
            else:
                extra = f" {size} bytes"
            rows.append(f"<li><a href='{href}'>{label}</a>{extra}</li>")
        rows.append("</ul>")
        self._page(head, f"Index of {urllib.parse.unquote(raw_path)}", "\n".join(rows))

    def _playlist(self, head: bool, files: list[Path], shuffle: bool, title: str) -> None:
        if shuffle:
            files = list(files)
            random.shuffle(files)
        lines = ["#EXTM3U"]
        for f in files:
            lines.append(f"#EXTINF:-1,{f.stem}")
            lines.append(self._absolute_url(f))
        self.send_response(HTTPStatus.OK)
        body = ("\n".join(lines) + "\n").encode()
        self.send_header("Content-Type", "audio/x-mpegurl")
        self.send_header("Content-Disposition", f'inline; filename="{_safe_name(title)}.m3u"')
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)
            self._sent += len(body)

    def _stats_page(self, head: bool, query: dict[str, list[str]]) -> None:
        snap = self.server.stats.snapshot()
        if query.get("format", [""])[-1] == "json":
            data = json.dumps(snap, indent=1).encode()
            self._send_body(head, HTTPStatus.OK, "application/json", data)
            return
        most = (
            "".join(f"<li>{html.escape(p)}: {n}</li>" for p, n in snap["most_played"])
            or "<li>nothing yet</li>"
        )
        recent = (
            "".join(
                f"<li>{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(r['time']))} "
                f"{html.escape(str(r['client']))} {html.escape(str(r['path']))}</li>"
                for r in snap["recent"]
            )
            or "<li>nothing yet</li>"
        )
        body = (
            f"<p>{snap['requests']} requests, {snap['bytes_sent']} bytes sent.</p>"
            f"<h2>Most played</h2><ol>{most}</ol><h2>Recently played</h2><ul>{recent}</ul>"
        )
        self._page(head, "Statistics", body)

    def _search_page(self, head: bool, query: dict[str, list[str]]) -> None:
        term = query.get("q", [""])[-1].strip().lower()
        hits: list[Path] = []
        if term:
            for dirpath, dirnames, filenames in os.walk(self.server.root, followlinks=False):
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                for name in sorted(dirnames) + sorted(filenames):
                    if term in name.lower():
                        hits.append(Path(dirpath, name))
                if len(hits) >= 500:
                    break
        items = "".join(
            f"<li><a href='{html.escape(self._url_for(p), True)}'>"
            f"{html.escape(p.relative_to(self.server.root).as_posix())}</a></li>"
            for p in hits[:500]
        )
        body = f"<p>{len(hits[:500])} matches for {html.escape(term)!s}</p><ul>{items}</ul>"
        self._page(head, "Search", body)

    # ---------------------------------------------------------------- files

    def _send_file(self, head: bool, path: Path) -> None:
        try:
            f: BinaryIO = path.open("rb")
        except OSError:
            self.send_error(HTTPStatus.FORBIDDEN, "Cannot open file")
            return
        with f:
            st = os.fstat(f.fileno())
            size = st.st_size
            etag = f'"{st.st_mtime_ns:x}-{size:x}"'
            range_header = self.headers.get("Range")
            if_range = self.headers.get("If-Range")
            if if_range is not None and if_range.strip() != etag:
                # The client's copy is stale: it gets the whole current file.
                range_header = None
            try:
                byte_range = parse_range(range_header, size)
            except Unsatisfiable:
                self._status = HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE
                self.send_response(HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE)
                self.send_header("Content-Range", f"bytes */{size}")
                self.send_header("Accept-Ranges", "bytes")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            first, last = byte_range if byte_range else (0, size - 1)
            length = last - first + 1 if size else 0
            self.send_response(HTTPStatus.PARTIAL_CONTENT if byte_range else HTTPStatus.OK)
            self.send_header("Content-Type", media_type(path.name))
            self.send_header("Content-Length", str(length))
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("ETag", etag)
            self.send_header("Last-Modified", self.date_time_string(int(st.st_mtime)))
            if byte_range:
                self.send_header("Content-Range", f"bytes {first}-{last}/{size}")
            self.end_headers()
            if head or length == 0:
                return
            streamable = is_streamable(path.name)
            if streamable and first == 0:
                self.server.stats.play(self._url_for(path), self.client_address[0])
            self._stream(f, path, st, first, length, streamable)

    def _stream(
        self, f: BinaryIO, path: Path, st: os.stat_result, first: int, length: int, paced: bool
    ) -> None:
        config = self.server.config
        rate = 0.0
        burst = 0.0
        if paced and config.pace > 0:
            duration = self.server.durations.get(path, st)
            media_rate = st.st_size / duration if duration else config.fallback_kbps * 1000.0 / 8.0
            rate = media_rate * config.pace
            burst = media_rate * config.burst
        pacer = Pacer(rate, burst)
        chunk = pacer.chunk_size()
        self.connection.settimeout(config.send_timeout)
        f.seek(first)
        remaining = length
        try:
            while remaining > 0:
                n = min(chunk, remaining)
                pacer.wait(n)
                data = f.read(n)
                if not data:
                    # The file shrank under us: the promised length cannot be kept.
                    self.close_connection = True
                    return
                self.wfile.write(data)
                pacer.sent_bytes(len(data))
                self._sent += len(data)
                remaining -= len(data)
        except (OSError, ValueError):
            # The client went away or stopped reading for too long.
            self.close_connection = True
        finally:
            self.connection.settimeout(config.idle_timeout)


def _safe_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name) or "playlist"


# --------------------------------------------------------------------------- main


def _network(value: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    try:
        return ipaddress.ip_network(value, strict=False)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"not a network in CIDR notation: {value}") from err


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ferry-media-server", description=DESCRIPTION)
    p.add_argument("--port", type=int, default=8888)
    p.add_argument("--bind", default="0.0.0.0")
    p.add_argument("--root", type=Path, default=Path("/home/mp3"))
    p.add_argument(
        "--pace", type=float, default=1.0, help="real-time rate factor; 0 disables pacing"
    )
    p.add_argument(
        "--burst", type=float, default=2.0, help="seconds of media sent at once at the start"
    )
    p.add_argument(
        "--fallback-kbps",
        type=float,
        default=400.0,
        help="assumed bitrate of media whose duration is unknown",
    )
    p.add_argument(
        "--allow",
        type=_network,
        nargs="+",
        action="extend",
        default=[],
        metavar="CIDR",
        help="serve only these client networks (default: all)",
    )
    p.add_argument(
        "--deny",
        type=_network,
        nargs="+",
        action="extend",
        default=[],
        metavar="CIDR",
        help="never serve these client networks; wins over --allow",
    )
    p.add_argument("--access-log", metavar="PATH", help="common log format; '-' for stdout")
    p.add_argument("--stats-file", type=Path, metavar="PATH", help="persist play statistics")
    p.add_argument("--idle-timeout", type=float, default=20.0)
    p.add_argument("--send-timeout", type=float, default=60.0)
    p.add_argument("--max-clients", type=int, default=256)
    return p


def config_from_args(argv: Sequence[str] | None) -> Config:
    args = build_parser().parse_args(argv)
    return Config(
        root=args.root,
        bind=args.bind,
        port=args.port,
        pace=args.pace,
        burst=args.burst,
        fallback_kbps=args.fallback_kbps,
        allow=list(args.allow),
        deny=list(args.deny),
        access_log=args.access_log,
        stats_file=args.stats_file,
        idle_timeout=args.idle_timeout,
        send_timeout=args.send_timeout,
        max_clients=args.max_clients,
    )


def main(argv: Sequence[str] | None = None) -> int:
    config = config_from_args(argv)
    if not config.root.is_dir():
        print(f"ferry-media-server: media root {config.root} is not a directory", file=sys.stderr)
        return 1
    try:
        server = MediaServer(config)
    except OSError as err:
        print(
            f"ferry-media-server: cannot listen on {config.bind}:{config.port}: {err}",
            file=sys.stderr,
        )
        return 1

    def stop(_signum: int, _frame: Any) -> None:
        # shutdown() waits for serve_forever, so it must run outside the signal handler's thread.
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print(
        f"ferry-media-server: serving {config.root} on {server.address()}",
        file=sys.stderr,
        flush=True,
    )
    try:
        server.serve_forever(poll_interval=0.5)
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
