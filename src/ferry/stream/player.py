"""A measuring media player: plays an HTTP stream in real time and records continuity.

It behaves as a real player does. Bytes arrive from the network into a buffer
measured in seconds of media (bytes are turned into seconds with the manifest
``<url>.json``: duration / size). Playback starts once ``prebuffer`` seconds are
buffered and then drains the buffer at one second of media per second of wall
time (monotonic clock). When the buffer is full (``buffer_seconds``) the player
stops reading, so the server is held back by TCP as it would be by a real one.

What it records:

- *stalls*: the buffer ran empty before the end of the media; playback resumes
  once ``resume`` seconds are buffered again. Start and length of each.
- *outages*: gaps of at least ``outage_min`` seconds in which the player wanted
  bytes and none came. For each: when, how long, the buffer level when the bytes
  stopped and, if the buffer ran dry, after how long (``drained_after_s``). When
  the source is paused on purpose this is the classic measurement of a player's
  buffer in seconds (``buffer_drain_s``).
- *reconnects*: on a reset or an early end of the body the player reconnects
  with ``Range: bytes=<received>-``, checks the 206 and its Content-Range, and
  counts it; it gives up after ``reconnect_window`` seconds without success.
- the longest gap between received bytes, the buffer level every
  ``sample_interval``, the byte count and whether the sha256 of all bytes
  matches the manifest's.

Exit status (:attr:`WatchReport.exit_code`) is a bit mask, 0 when all is well:
``EXIT_STALLED`` (4) playback stalled, ``EXIT_RECONNECTED`` (8) the connection
had to be re-established, ``EXIT_MISMATCH`` (16) the bytes differ from the
manifest's size or sha256, ``EXIT_INCOMPLETE`` (32) the player gave up before
the end of the media. 1 is left for errors that stop a watch from starting and
2 for usage errors.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import socket
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from ferry.errors import FerryError

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_STALLED = 4
EXIT_RECONNECTED = 8
EXIT_MISMATCH = 16
EXIT_INCOMPLETE = 32

USER_AGENT = "ferry-watch/1"
READ_SIZE = 4096
HEADER_LIMIT = 16384
CONNECT_TIMEOUT_S = 10.0
DEFAULT_ASSUME_KBPS = 400.0


class WatchError(FerryError):
    """A watch could not start or its stream could not be read."""


class _StreamBroken(Exception):
    """The connection ended or misbehaved; a reconnect may cure it."""


# --------------------------------------------------------------------------- report


@dataclass
class Stall:
    start_s: float
    duration_s: float
    ongoing: bool = False


@dataclass
class Outage:
    start_s: float
    gap_s: float
    buffer_s: float
    stalled: bool
    drained_after_s: float | None
    ongoing: bool = False


@dataclass
class Reconnect:
    t_s: float
    offset: int
    reason: str
    resumed: bool


@dataclass
class Status:
    """What the live status line shows; handed to ``on_status`` every sample."""

    t_s: float
    state: str
    buffer_s: float
    played_s: float
    duration_s: float | None
    bytes_received: int
    total_bytes: int | None
    stalls: int
    stalled_s: float
    reconnects: int
    gap_s: float


@dataclass
class WatchReport:
    url: str
    buffer_seconds: float
    prebuffer_s: float
    resume_s: float
    duration_s: float | None = None
    duration_source: str = "manifest"
    expected_size: int | None = None
    expected_sha256: str | None = None
    started_at: float = 0.0
    elapsed_s: float = 0.0
    playback_started_s: float | None = None
    played_s: float = 0.0
    ended: str = "running"
    bytes_received: int = 0
    sha256: str = ""
    checksum: str = "unverified"
    stalls: list[Stall] = field(default_factory=list)
    outages: list[Outage] = field(default_factory=list)
    reconnects: int = 0
    reconnect_events: list[Reconnect] = field(default_factory=list)
    longest_gap_ms: float = 0.0
    timeline: list[tuple[float, float, int]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    error: str | None = None

    @property
    def stalled_s(self) -> float:
        return sum(s.duration_s for s in self.stalls)

    @property
    def buffer_drain_s(self) -> list[float]:
        """For each outage that emptied the buffer: seconds played from the buffer."""
        return [o.drained_after_s for o in self.outages if o.drained_after_s is not None]

    @property
    def exit_code(self) -> int:
        code = EXIT_OK
        if self.stalls:
            code |= EXIT_STALLED
        if self.reconnects or any(not r.resumed for r in self.reconnect_events):
            code |= EXIT_RECONNECTED
        if self.checksum == "mismatch":
            code |= EXIT_MISMATCH
        if self.ended in ("gave-up", "error"):
            code |= EXIT_INCOMPLETE
        return code

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["stalled_s"] = round(self.stalled_s, 3)
        data["buffer_drain_s"] = self.buffer_drain_s
        data["exit_code"] = self.exit_code
        data["timeline"] = [list(s) for s in self.timeline]
        return data

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)


# --------------------------------------------------------------------------- playback


class Playback:
    """The player's buffer and clock: bytes in, seconds of media out, in real time.

    Every change of state is computed at the instant it happened (a stall begins
    exactly when the buffer reached zero), not at the next sampling tick.
    """

    def __init__(self, seconds_per_byte: float, prebuffer: float, resume: float, t0: float) -> None:
        self.spb = seconds_per_byte
        self.prebuffer = prebuffer
        self.resume = resume
        self.received = 0
        self.complete = False
        self.played = 0.0
        self.state = "prebuffering"  # playing | stalled | finished
        self.t_last = t0
        self.t0 = t0
        self.started_at: float | None = None
        self.finished_at: float | None = None
        self.stall_start: float | None = None
        self.stalls: list[Stall] = []

    @property
    def received_s(self) -> float:
        return self.received * self.spb

    def level(self) -> float:
        return max(0.0, self.received_s - self.played)

    def advance(self, now: float) -> None:
        if self.state == "playing" and now > self.t_last:
            available = self.received_s - self.played
            elapsed = now - self.t_last
            if elapsed >= available:
                self.played += max(0.0, available)
                empty_at = self.t_last + max(0.0, available)
                if self.complete:
                    self.state = "finished"
                    self.finished_at = empty_at
                else:
                    self.state = "stalled"
                    self.stall_start = empty_at
            else:
                self.played += elapsed
        self.t_last = max(self.t_last, now)

    def add(self, now: float, nbytes: int, complete: bool) -> None:
        self.advance(now)
        self.received += nbytes
        self.complete = self.complete or complete
        self._maybe_play(now)

    def mark_complete(self, now: float) -> None:
        self.advance(now)
        self.complete = True
        self._maybe_play(now)

    def _maybe_play(self, now: float) -> None:
        level = self.level()
        if self.state == "prebuffering" and (level >= self.prebuffer or self.complete):
            self.state = "playing"
            self.started_at = now
        elif self.state == "stalled" and (level >= self.resume or self.complete):
            assert self.stall_start is not None
            self.stalls.append(Stall(self.stall_start - self.t0, now - self.stall_start))
            self.stall_start = None
            self.state = "playing"
        if self.state == "playing" and self.complete and level <= 0:
            self.state = "finished"
            self.finished_at = now

    def close(self, now: float) -> None:
        """End of the watch: a stall still going on is recorded up to ``now``."""
        self.advance(now)
        if self.state == "stalled" and self.stall_start is not None:
            self.stalls.append(
                Stall(self.stall_start - self.t0, now - self.stall_start, ongoing=True)
            )
            self.stall_start = None

    def stalled_since(self, since: float, until: float) -> float | None:
        """When the first stall that began in [since, until] began, if any."""
        starts = [s.start_s + self.t0 for s in self.stalls]
        if self.stall_start is not None:
            starts.append(self.stall_start)
        hits = [s for s in starts if since - 1e-9 <= s <= until]
        return min(hits) if hits else None


# --------------------------------------------------------------------------- http


@dataclass
class _Url:
    host: str
    port: int
    target: str
    authority: str


def _parse_url(url: str) -> _Url:
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise WatchError(f"watch {url}: only http://host[:port]/path URLs are supported")
    try:
        port = parts.port or 80
    except ValueError as err:
        raise WatchError(f"watch {url}: bad port") from err
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return _Url(parts.hostname, port, target, parts.netloc)


@dataclass
class _Response:
    status: int
    headers: dict[str, str]
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter


async def _request(
    url: _Url, offset: int, recv_buffer: int, timeout: float = CONNECT_TIMEOUT_S
) -> _Response:
    """Open a connection, send a GET (ranged from ``offset`` if > 0), read the head."""
    sock = socket.socket(socket.AF_INET6 if ":" in url.host else socket.AF_INET)
    # A small receive buffer keeps the kernel from hiding seconds of media from the
    # player's own buffer accounting.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, recv_buffer)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(url.host, url.port, family=sock.family)
        await asyncio.wait_for(loop.sock_connect(sock, infos[0][4]), timeout)
        reader, writer = await asyncio.open_connection(sock=sock, limit=READ_SIZE * 2)
    except (OSError, TimeoutError) as err:
        sock.close()
        raise _StreamBroken(f"connect to {url.authority}: {err or 'timed out'}") from err
    lines = [
        f"GET {url.target} HTTP/1.1",
        f"Host: {url.authority}",
        f"User-Agent: {USER_AGENT}",
        "Accept: */*",
        "Connection: close",
    ]
    if offset > 0:
        lines.append(f"Range: bytes={offset}-")
    try:
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
    except (OSError, TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as err:
        writer.close()
        raise _StreamBroken(f"request to {url.authority}: {err or 'timed out'}") from err
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    fields = status_line.split(" ", 2)
    if len(fields) < 2 or not fields[0].startswith("HTTP/") or not fields[1].isdigit():
        writer.close()
        raise _StreamBroken(f"bad status line from {url.authority}: {status_line[:80]!r}")
    headers: dict[str, str] = {}
    for line in header_lines:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    return _Response(int(fields[1]), headers, reader, writer)


async def fetch_manifest(url: str, timeout: float = CONNECT_TIMEOUT_S) -> dict[str, Any] | None:
    """The manifest ``<url>.json`` as a dict, or None when there is none."""
    manifest_url = _parse_url(url)
    path, _, query = manifest_url.target.partition("?")
    manifest_url.target = path + ".json" + (f"?{query}" if query else "")
    try:
        resp = await _request(manifest_url, 0, 65536, timeout)
    except _StreamBroken:
        return None
    try:
        length = int(resp.headers.get("content-length", "-1"))
        if resp.status != 200 or not 0 <= length <= 1 << 20:
            return None
        body = await asyncio.wait_for(resp.reader.readexactly(length), timeout)
        data = json.loads(body)
    except (OSError, TimeoutError, ValueError, asyncio.IncompleteReadError):
        return None
    finally:
        resp.writer.close()
    return data if isinstance(data, dict) else None


# --------------------------------------------------------------------------- session


class _Session:
    def __init__(
        self,
        url: str,
        report: WatchReport,
        *,
        buffer_seconds: float,
        outage_min: float,
        read_timeout: float,
        reconnect_window: float,
        sample_interval: float,
        recv_buffer: int,
        on_status: Callable[[Status], None] | None,
    ) -> None:
        self.url = _parse_url(url)
        self.report = report
        self.capacity = buffer_seconds
        self.outage_min = outage_min
        self.read_timeout = read_timeout
        self.reconnect_window = reconnect_window
        self.sample_interval = sample_interval
        self.recv_buffer = recv_buffer
        self.on_status = on_status
        self.t0 = time.monotonic()
        self.playback: Playback | None = None
        self.digest = hashlib.sha256()
        self.total: int | None = report.expected_size
        self.gap_from = self.t0
        self.gap_level = 0.0
        self.done = asyncio.Event()
        self.reconnecting = False

    def now(self) -> float:
        return time.monotonic()

    # ------------------------------------------------------------ network side

    async def fetch(self) -> None:
        offset = 0
        broken_since: float | None = None
        attempt = 0
        while True:
            try:
                resp = await _request(self.url, offset, self.recv_buffer)
                self._check_response(resp, offset)
            except _StreamBroken as err:
                if offset == 0 and broken_since is None:
                    raise WatchError(f"watch {self.report.url}: {err}") from None
                now = self.now()
                broken_since = broken_since or now
                self.report.reconnect_events.append(
                    Reconnect(round(now - self.t0, 3), offset, str(err), resumed=False)
                )
                if now - broken_since >= self.reconnect_window:
                    self.report.ended = "gave-up"
                    self.report.error = f"no resume within {self.reconnect_window:g} s: {err}"
                    return
                attempt += 1
                await asyncio.sleep(min(2.0, 0.1 * 2**attempt))
                continue
            if broken_since is not None:
                self.report.reconnects += 1
                self.report.reconnect_events[-1].resumed = True
                broken_since = None
                attempt = 0
            self.reconnecting = False
            try:
                await self._read_body(resp, offset)
                return
            except _StreamBroken as err:
                now = self.now()
                self.reconnecting = True
                broken_since = now
                offset = self.playback.received if self.playback else 0
                self.report.reconnect_events.append(
                    Reconnect(round(now - self.t0, 3), offset, str(err), resumed=False)
                )
            finally:
                resp.writer.close()

    def _check_response(self, resp: _Response, offset: int) -> None:
        if "chunked" in resp.headers.get("transfer-encoding", "").lower():
            resp.writer.close()
            raise WatchError(f"watch {self.report.url}: chunked transfer encoding not supported")
        if offset == 0:
            if resp.status != 200:
                resp.writer.close()
                raise WatchError(f"watch {self.report.url}: server answered {resp.status}")
            length = resp.headers.get("content-length")
            if length is not None and length.isdigit():
                if self.total is not None and int(length) != self.total:
                    self.report.notes.append(
                        f"Content-Length {length} differs from the manifest's size {self.total}"
                    )
                self.total = int(length)
            return
        expected = f"bytes {offset}-"
        content_range = resp.headers.get("content-range", "")
        if resp.status != 206 or not content_range.startswith(expected):
            resp.writer.close()
            raise _StreamBroken(
                f"resume at byte {offset} refused: {resp.status} {content_range or '-'}"
            )
        last_s, _, total_s = content_range[len(expected) :].partition("/")
        if (
            self.total is not None
            and total_s.isdigit()
            and (int(total_s) != self.total or int(last_s or -1) != self.total - 1)
        ):
            resp.writer.close()
            raise _StreamBroken(f"resume at byte {offset}: unexpected range {content_range}")

    async def _read_body(self, resp: _Response, offset: int) -> None:
        assert self.playback is not None
        pb = self.playback
        length_s = resp.headers.get("content-length")
        remaining = int(length_s) if length_s and length_s.isdigit() else None
        while remaining is None or remaining > 0:
            await self._wait_for_room()
            n = READ_SIZE if remaining is None else min(READ_SIZE, remaining)
            try:
                data = await asyncio.wait_for(resp.reader.read(n), self.read_timeout)
            except TimeoutError:
                raise _StreamBroken(f"no data for {self.read_timeout:g} s") from None
            except OSError as err:
                raise _StreamBroken(f"connection broken: {err}") from None
            now = self.now()
            if not data:
                if remaining is None:
                    pb.mark_complete(now)
                    return
                raise _StreamBroken(f"connection closed {remaining} bytes early")
            self._note_gap(now)
            self.digest.update(data)
            if remaining is not None:
                remaining -= len(data)
            complete = self.total is not None and pb.received + len(data) >= self.total
            pb.add(now, len(data), complete)
            self.gap_from = now
            self.gap_level = pb.level()
        pb.mark_complete(self.now())

    def _note_gap(self, now: float) -> None:
        """Bytes came in at ``now``: record the wait for them if it was long."""
        assert self.playback is not None
        self.playback.advance(now)
        gap = now - self.gap_from
        self.report.longest_gap_ms = max(self.report.longest_gap_ms, gap * 1000.0)
        if gap >= self.outage_min:
            self.report.outages.append(self._outage(now, ongoing=False))

    def _outage(self, now: float, ongoing: bool) -> Outage:
        assert self.playback is not None
        stall = self.playback.stalled_since(self.gap_from, now)
        return Outage(
            start_s=round(self.gap_from - self.t0, 3),
            gap_s=round(now - self.gap_from, 3),
            buffer_s=round(self.gap_level, 3),
            stalled=stall is not None,
            drained_after_s=None if stall is None else round(stall - self.gap_from, 3),
            ongoing=ongoing,
        )

    async def _wait_for_room(self) -> None:
        """Hold off reading while the buffer is full, as a real player does."""
        assert self.playback is not None
        pb = self.playback
        waited = False
        while True:
            pb.advance(self.now())
            excess = pb.level() - self.capacity
            if excess < 0 or pb.state != "playing":
                break
            waited = True
            # The buffer drains at exactly one second per second, so this is when room opens.
            await asyncio.sleep(excess + 0.01)
        if waited:
            self.gap_from = self.now()
            self.gap_level = pb.level()

    # ------------------------------------------------------------ playback side

    def status(self, now: float) -> Status:
        assert self.playback is not None
        pb = self.playback
        state = "reconnecting" if self.reconnecting and pb.state != "finished" else pb.state
        ongoing = now - pb.stall_start if pb.stall_start is not None else 0.0
        return Status(
            t_s=now - self.t0,
            state=state,
            buffer_s=pb.level(),
            played_s=pb.played,
            duration_s=self.report.duration_s,
            bytes_received=pb.received,
            total_bytes=self.total,
            stalls=len(pb.stalls) + (1 if pb.stall_start is not None else 0),
            stalled_s=sum(s.duration_s for s in pb.stalls) + ongoing,
            reconnects=self.report.reconnects,
            gap_s=now - self.gap_from,
        )

    async def tick(self, deadline: float | None) -> None:
        assert self.playback is not None
        pb = self.playback
        next_at = self.t0
        while not self.done.is_set():
            now = self.now()
            pb.advance(now)
            self.report.timeline.append(
                (round(now - self.t0, 3), round(pb.level(), 3), pb.received)
            )
            if self.on_status is not None:
                self.on_status(self.status(now))
            if pb.state == "finished":
                self.report.ended = "complete"
                return
            if deadline is not None and now >= deadline:
                self.report.ended = "max-time"
                return
            next_at += self.sample_interval
            delay = max(0.0, next_at - self.now())
            if deadline is not None:
                delay = min(delay, max(0.0, deadline - self.now()))
            if pb.state == "playing" and pb.complete:
                # Wake when playback ends so that the watch does not outlive the media.
                delay = min(delay, pb.level() + 0.001)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.done.wait(), delay)

    async def run(self, deadline: float | None) -> None:
        ticker = asyncio.create_task(self.tick(deadline))
        fetcher = asyncio.create_task(self.fetch())
        try:
            done, _pending = await asyncio.wait(
                {ticker, fetcher}, return_when=asyncio.FIRST_COMPLETED
            )
            if fetcher in done:
                fetcher.result()
                if self.report.ended == "gave-up":
                    self.done.set()
                await ticker
        finally:
            for task in (ticker, fetcher):
                if not task.done():
                    task.cancel()
            await asyncio.gather(ticker, fetcher, return_exceptions=True)

    def finish(self) -> None:
        assert self.playback is not None
        pb = self.playback
        now = self.now()
        if pb.state != "finished":
            pb.close(now)
        gap = now - self.gap_from
        if not pb.complete and gap >= self.outage_min:
            self.report.outages.append(self._outage(now, ongoing=True))
        report = self.report
        report.elapsed_s = round(now - self.t0, 3)
        report.stalls = [
            Stall(round(s.start_s, 3), round(s.duration_s, 3), s.ongoing) for s in pb.stalls
        ]
        report.playback_started_s = (
            None if pb.started_at is None else round(pb.started_at - self.t0, 3)
        )
        report.played_s = round(pb.played, 3)
        report.bytes_received = pb.received
        report.longest_gap_ms = round(report.longest_gap_ms, 1)
        report.sha256 = self.digest.hexdigest()
        if report.expected_sha256 is None:
            report.checksum = "unverified"
        elif report.sha256 == report.expected_sha256 and (
            report.expected_size is None or pb.received == report.expected_size
        ):
            report.checksum = "match"
        elif pb.complete:
            report.checksum = "mismatch"
        else:
            report.checksum = "unverified"
            report.notes.append("stream not received to the end: checksum not verified")


# --------------------------------------------------------------------------- entry points


async def watch_async(
    url: str,
    *,
    buffer_seconds: float = 10.0,
    prebuffer: float = 2.0,
    resume: float | None = None,
    timeout: float | None = None,
    on_status: Callable[[Status], None] | None = None,
    outage_min: float = 0.5,
    read_timeout: float = 60.0,
    reconnect_window: float = 30.0,
    sample_interval: float = 0.1,
    assume_kbps: float = DEFAULT_ASSUME_KBPS,
    recv_buffer: int = 16384,
) -> WatchReport:
    """Play ``url`` in real time and report on its continuity (see the module doc)."""
    if buffer_seconds <= 0 or prebuffer < 0 or prebuffer > buffer_seconds:
        raise WatchError(
            f"watch {url}: need 0 <= prebuffer ({prebuffer:g}) <= buffer ({buffer_seconds:g})"
        )
    resume_s = prebuffer if resume is None else min(resume, buffer_seconds)
    report = WatchReport(url, buffer_seconds, prebuffer, resume_s, started_at=time.time())
    manifest = await fetch_manifest(url)
    spb = 8.0 / (assume_kbps * 1000.0)
    try:
        if manifest is None:
            raise ValueError("no manifest")
        duration = float(manifest["duration"])
        size = int(manifest["size"])
        if duration <= 0 or size <= 0:
            raise ValueError("empty media")
        report.duration_s = duration
        report.expected_size = size
        sha = manifest.get("sha256")
        report.expected_sha256 = str(sha) if sha else None
        spb = duration / size
    except (KeyError, TypeError, ValueError):
        report.duration_source = "estimate"
        report.notes.append(
            f"no usable manifest at {url}.json: media time estimated at {assume_kbps:g} kbit/s, "
            "checksum not verified"
        )
    session = _Session(
        url,
        report,
        buffer_seconds=buffer_seconds,
        outage_min=outage_min,
        read_timeout=read_timeout,
        reconnect_window=reconnect_window,
        sample_interval=sample_interval,
        recv_buffer=recv_buffer,
        on_status=on_status,
    )
    session.playback = Playback(spb, prebuffer, resume_s, session.t0)
    deadline = None if timeout is None else session.t0 + timeout
    try:
        await session.run(deadline)
    except asyncio.CancelledError:
        # Cancelling a watch means "stop playing now": the viewer closed the
        # player, and the report covers what was played so far.
        report.ended = "stopped"
    finally:
        if report.duration_s is None and session.total is not None:
            report.duration_s = round(session.total * spb, 3)
        session.finish()
    return report


def watch(
    url: str,
    *,
    buffer_seconds: float = 10.0,
    prebuffer: float = 2.0,
    timeout: float | None = None,
    on_status: Callable[[Status], None] | None = None,
    **options: Any,
) -> WatchReport:
    """Synchronous :func:`watch_async`, for callers without an event loop."""
    return asyncio.run(
        watch_async(
            url,
            buffer_seconds=buffer_seconds,
            prebuffer=prebuffer,
            timeout=timeout,
            on_status=on_status,
            **options,
        )
    )
