"""The network side of a watch: read the stream into the playback model, resume on breaks.

A reset or an early end of the body is answered with a new request from the
byte received last (``Range: bytes=<received>-``), whose 206 and Content-Range
are checked; after ``reconnect_window`` seconds without success the session
gives up. Gaps between received bytes are measured here, and the long ones
recorded as outages.
"""

from __future__ import annotations

import asyncio
import hashlib
import time

from .connection import READ_SIZE, Response, StreamBroken, parse_url, request
from .errors import WatchError
from .playback import Playback
from .reconnect import ReconnectBudget
from .report import Outage, Reconnect, WatchReport
from .state import PlayState


class StreamSession:
    def __init__(
        self,
        url: str,
        report: WatchReport,
        playback: Playback,
        *,
        buffer_seconds: float,
        outage_min: float,
        read_timeout: float,
        reconnect_window: float,
        recv_buffer: int,
    ) -> None:
        self.url = parse_url(url)
        self.report = report
        self.playback = playback
        self.capacity = buffer_seconds
        self.outage_min = outage_min
        self.read_timeout = read_timeout
        self.reconnect_window = reconnect_window
        self.recv_buffer = recv_buffer
        self.t0 = playback.t0
        self.digest = hashlib.sha256()
        self.total: int | None = report.expected_size
        self.gap_from = self.t0
        self.gap_level = 0.0
        self.reconnecting = False

    def now(self) -> float:
        return time.monotonic()

    async def fetch(self) -> None:
        offset = 0
        budget = ReconnectBudget(self.reconnect_window)
        while True:
            try:
                resp = await request(self.url, offset, self.recv_buffer)
                self._check_response(resp, offset)
            except StreamBroken as err:
                if offset == 0 and not budget.broken:
                    raise WatchError(f"watch {self.report.url}: {err}") from None
                now = self.now()
                pause = budget.failed(now)
                self.report.reconnect_events.append(
                    Reconnect(round(now - self.t0, 3), offset, str(err), resumed=False)
                )
                if pause is None:
                    self.report.ended = "gave-up"
                    self.report.error = f"no resume within {self.reconnect_window:g} s: {err}"
                    return
                await asyncio.sleep(pause)
                continue
            if budget.broken:
                self.report.reconnects += 1
                self.report.reconnect_events[-1].resumed = True
                budget.resumed()
            self.reconnecting = False
            try:
                await self._read_body(resp)
                return
            except StreamBroken as err:
                now = self.now()
                self.reconnecting = True
                budget.broke(now)
                offset = self.playback.received
                self.report.reconnect_events.append(
                    Reconnect(round(now - self.t0, 3), offset, str(err), resumed=False)
                )
            finally:
                resp.close()

    def _check_response(self, resp: Response, offset: int) -> None:
        if "chunked" in resp.headers.get("transfer-encoding", "").lower():
            resp.close()
            raise WatchError(f"watch {self.report.url}: chunked transfer encoding not supported")
        if offset == 0:
            if resp.status != 200:
                resp.close()
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
            resp.close()
            raise StreamBroken(
                f"resume at byte {offset} refused: {resp.status} {content_range or '-'}"
            )
        last_s, _, total_s = content_range[len(expected) :].partition("/")
        if (
            self.total is not None
            and total_s.isdigit()
            and (int(total_s) != self.total or int(last_s or -1) != self.total - 1)
        ):
            resp.close()
            raise StreamBroken(f"resume at byte {offset}: unexpected range {content_range}")

    async def _read_body(self, resp: Response) -> None:
        pb = self.playback
        length_s = resp.headers.get("content-length")
        remaining = int(length_s) if length_s and length_s.isdigit() else None
        while remaining is None or remaining > 0:
            await self._wait_for_room()
            n = READ_SIZE if remaining is None else min(READ_SIZE, remaining)
            try:
                async with asyncio.timeout(self.read_timeout):
                    data = await resp.read(n)
            except TimeoutError:
                raise StreamBroken(f"no data for {self.read_timeout:g} s") from None
            except OSError as err:
                raise StreamBroken(f"connection broken: {err}") from None
            now = self.now()
            if not data:
                if remaining is None:
                    pb.mark_complete(now)
                    return
                raise StreamBroken(f"connection closed {remaining} bytes early")
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
        self.playback.advance(now)
        gap = now - self.gap_from
        self.report.longest_gap_ms = max(self.report.longest_gap_ms, gap * 1000.0)
        if gap >= self.outage_min:
            self.report.outages.append(self.outage(now, ongoing=False))

    def outage(self, now: float, ongoing: bool) -> Outage:
        """The gap in received bytes from ``gap_from`` to ``now``, as an outage."""
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
        pb = self.playback
        waited = False
        while True:
            pb.advance(self.now())
            excess = pb.level() - self.capacity
            if excess < 0 or pb.state != PlayState.PLAYING:
                break
            waited = True
            # The buffer drains at exactly one second per second, so this is when room opens.
            await asyncio.sleep(excess + 0.01)
        if waited:
            self.gap_from = self.now()
            self.gap_level = pb.level()
