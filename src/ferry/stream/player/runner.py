"""A watch from start to report: the manifest, the sampling ticker, the stream, the end."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import Any

from .connection import fetch_manifest
from .errors import WatchError
from .playback import Playback
from .report import Stall, Status, WatchReport
from .session import StreamSession
from .state import RECONNECTING, PlayState

DEFAULT_ASSUME_KBPS = 400.0


class _Watch:
    """The playback side: samples the buffer, reports status, decides when it ended."""

    def __init__(
        self,
        session: StreamSession,
        sample_interval: float,
        on_status: Callable[[Status], None] | None,
    ) -> None:
        self.session = session
        self.playback = session.playback
        self.report = session.report
        self.t0 = session.t0
        self.sample_interval = sample_interval
        self.on_status = on_status
        self.done = asyncio.Event()

    def now(self) -> float:
        return time.monotonic()

    def status(self, now: float) -> Status:
        pb = self.playback
        s = self.session
        reconnecting = s.reconnecting and pb.state != PlayState.FINISHED
        state = RECONNECTING if reconnecting else pb.state.value
        ongoing = now - pb.stall_start if pb.stall_start is not None else 0.0
        return Status(
            t_s=now - self.t0,
            state=state,
            buffer_s=pb.level(),
            played_s=pb.played,
            duration_s=self.report.duration_s,
            bytes_received=pb.received,
            total_bytes=s.total,
            stalls=len(pb.stalls) + (1 if pb.stall_start is not None else 0),
            stalled_s=sum(st.duration_s for st in pb.stalls) + ongoing,
            reconnects=self.report.reconnects,
            gap_s=now - s.gap_from,
        )

    async def tick(self, deadline: float | None) -> None:
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
            if pb.state == PlayState.FINISHED:
                self.report.ended = "complete"
                return
            if deadline is not None and now >= deadline:
                self.report.ended = "max-time"
                return
            next_at += self.sample_interval
            delay = max(0.0, next_at - self.now())
            if deadline is not None:
                delay = min(delay, max(0.0, deadline - self.now()))
            if pb.state == PlayState.PLAYING and pb.complete:
                # Wake when playback ends so that the watch does not outlive the media.
                delay = min(delay, pb.level() + 0.001)
            # asyncio.timeout, not wait_for: 3.11's wait_for can lose a cancellation.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self.done.wait()

    async def run(self, deadline: float | None, stop: asyncio.Event) -> None:
        """Play until the media ends, the deadline passes, the stream is given up or
        ``stop`` is set; a cancellation ends the tasks and goes on to the caller."""
        url = self.report.url
        ticker = asyncio.create_task(self.tick(deadline), name=f"watch ticker {url}")
        fetcher = asyncio.create_task(self.session.fetch(), name=f"watch fetcher {url}")
        stopper = asyncio.create_task(stop.wait(), name=f"watch stop {url}")
        try:
            done, _pending = await asyncio.wait(
                {ticker, fetcher, stopper}, return_when=asyncio.FIRST_COMPLETED
            )
            if fetcher in done and stopper not in done:
                fetcher.result()
                if self.report.ended == "gave-up":
                    self.done.set()
                # The stream is in (or given up): play out the buffer, unless stopped.
                done, _pending = await asyncio.wait(
                    {ticker, stopper}, return_when=asyncio.FIRST_COMPLETED
                )
            if ticker in done:
                ticker.result()
            elif stopper in done:
                self.report.ended = "stopped"
        finally:
            tasks = (ticker, fetcher, stopper)
            for task in tasks:
                task.cancel()
            # Only the children's own ends are collected here; this task's
            # cancellation, if that is why we are here, goes on to the caller.
            await asyncio.gather(*tasks, return_exceptions=True)

    def finish(self) -> None:
        pb = self.playback
        s = self.session
        now = self.now()
        if pb.state != PlayState.FINISHED:
            pb.close(now)
        gap = now - s.gap_from
        if not pb.complete and gap >= s.outage_min:
            self.report.outages.append(s.outage(now, ongoing=True))
        report = self.report
        report.elapsed_s = round(now - self.t0, 3)
        report.stalls = [
            Stall(round(st.start_s, 3), round(st.duration_s, 3), st.ongoing) for st in pb.stalls
        ]
        report.playback_started_s = (
            None if pb.started_at is None else round(pb.started_at - self.t0, 3)
        )
        report.played_s = round(pb.played, 3)
        report.bytes_received = pb.received
        report.longest_gap_ms = round(report.longest_gap_ms, 1)
        report.sha256 = s.digest.hexdigest()
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
    stop: asyncio.Event | None = None,
) -> WatchReport:
    """Play ``url`` in real time and report on its continuity (see the package doc).

    Setting ``stop`` ends the watch early with its report (``ended`` is
    "stopped"), as a viewer closing the player. Cancelling the task that runs
    it cancels the watch: the CancelledError reaches the caller, with no report.
    """
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
    t0 = time.monotonic()
    session = StreamSession(
        url,
        report,
        Playback(spb, prebuffer, resume_s, t0),
        buffer_seconds=buffer_seconds,
        outage_min=outage_min,
        read_timeout=read_timeout,
        reconnect_window=reconnect_window,
        recv_buffer=recv_buffer,
    )
    watcher = _Watch(session, sample_interval, on_status)
    deadline = None if timeout is None else t0 + timeout
    try:
        await watcher.run(deadline, stop or asyncio.Event())
    finally:
        if report.duration_s is None and session.total is not None:
            report.duration_s = round(session.total * spb, 3)
        watcher.finish()
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
