"""One HTTP connection: parse, check, dispatch, answer, log."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import urllib.parse
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any, BinaryIO

from . import pages, playlists
from .access import client_allowed
from .accesslog import common_log_line
from .context import ServerContext
from .mediatypes import is_streamable, media_type
from .pacing import Pacer, media_pacer
from .paths import Refused, absolute_url, resolve, url_for
from .ranges import Unsatisfiable, parse_range

SERVER_NAME = "ferry-media-server/1"


class MediaHandler(BaseHTTPRequestHandler):
    server_version = SERVER_NAME
    sys_version = ""
    protocol_version = "HTTP/1.1"

    # Error replies to unparsable request lines must still carry a status line,
    # which the stdlib omits when it takes the request for HTTP/0.9.
    default_request_version = "HTTP/1.0"

    @property
    def ctx(self) -> ServerContext:
        ctx = getattr(self.server, "ctx", None)
        if not isinstance(ctx, ServerContext):
            raise TypeError(f"{type(self.server).__name__} carries no ServerContext")
        return ctx

    def _too_slow(self) -> None:
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_RDWR)

    def parse_request(self) -> bool:
        ok = super().parse_request()
        # The head has arrived (or failed): the deadline no longer applies.
        self._head_timer.cancel()
        if not ok:
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
        self.connection.settimeout(self.ctx.config.idle_timeout)
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

    def handle_one_request(self) -> None:
        self._sent = 0
        self._status = 0
        self.requestline = ""
        # The whole request head within the deadline: past it, the connection
        # is shut, which ends any read still waiting for the rest.
        self._head_timer = threading.Timer(self.ctx.config.request_deadline, self._too_slow)
        self._head_timer.daemon = True
        self._head_timer.start()
        try:
            super().handle_one_request()
        finally:
            self._head_timer.cancel()
        if self.requestline:
            client = self.client_address[0]
            self.ctx.access_log.write(
                common_log_line(client, self.requestline, self._status, self._sent)
            )
            self.ctx.stats.request(self._sent)

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
        ctx = self.ctx
        if not client_allowed(ctx.config, self.client_address[0]):
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
            term = query.get("q", [""])[-1].strip().lower()
            body = pages.search_body(ctx.root, term, pages.search(ctx.root, term))
            self._send_page(head, "Search", body)
            return
        try:
            path = resolve(ctx.root, raw_path)
        except Refused as refused:
            self.send_error(refused.status, refused.reason)
            return
        if path.is_dir():
            if not raw_path.endswith("/"):
                self._redirect(raw_path + "/" + ("?" + query_s if query_s else ""))
            elif "m3u" in query:
                shuffle = query["m3u"][-1] == "shuffle"
                files = playlists.walk_media(ctx.root, path)
                self._send_playlist(head, files, shuffle, path.name or "root")
            else:
                self._directory_page(head, path, raw_path)
        elif path.is_file():
            if "m3u" in query:
                self._send_playlist(head, [path], False, path.stem)
            else:
                self._send_file(head, path)
        else:
            self.send_error(HTTPStatus.NOT_FOUND, "Not found")

    # ---------------------------------------------------------------- responses

    def _send_body(
        self, head: bool, status: int, ctype: str, body: bytes, extra: dict[str, str] | None = None
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        for name, value in (extra or {}).items():
            self.send_header(name, value)
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

    def _send_page(self, head: bool, title: str, body: str) -> None:
        doc = pages.page(title, body)
        self._send_body(head, HTTPStatus.OK, "text/html; charset=utf-8", doc)

    def _directory_page(self, head: bool, path: Path, raw_path: str) -> None:
        try:
            listing = pages.directory_listing(self.ctx.root, path)
        except OSError:
            self.send_error(HTTPStatus.FORBIDDEN, "Cannot list directory")
            return
        self._send_page(head, f"Index of {urllib.parse.unquote(raw_path)}", listing)

    def _send_playlist(self, head: bool, files: list[Path], shuffle: bool, title: str) -> None:
        ctx = self.ctx
        host = self.headers.get("Host")
        body = playlists.m3u(files, lambda f: absolute_url(host, ctx.address, ctx.root, f), shuffle)
        disposition = f'inline; filename="{playlists.safe_name(title)}.m3u"'
        extra = {"Content-Disposition": disposition}
        self._send_body(head, HTTPStatus.OK, "audio/x-mpegurl", body, extra)

    def _stats_page(self, head: bool, query: dict[str, list[str]]) -> None:
        snap = self.ctx.stats.snapshot()
        if query.get("format", [""])[-1] == "json":
            data = json.dumps(snap, indent=1).encode()
            self._send_body(head, HTTPStatus.OK, "application/json", data)
            return
        self._send_page(head, "Statistics", pages.stats_body(snap))

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
                self.ctx.stats.play(url_for(self.ctx.root, path), self.client_address[0])
            self._stream(f, path, st, first, length, streamable)

    def _stream(
        self, f: BinaryIO, path: Path, st: os.stat_result, first: int, length: int, paced: bool
    ) -> None:
        config = self.ctx.config
        duration = self.ctx.durations.get(path, st) if paced and config.pace > 0 else None
        pacer = media_pacer(config, st.st_size, duration) if paced else Pacer(0.0, 0.0)
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
