"""``ferry watch URL``: play a stream in real time and report whether it stalled.

The lead wires this into ``ferry`` with :func:`add_watch_arguments` and
:func:`run_watch`. The exit status is the report's bit mask (see
:mod:`ferry.stream.player`): 0 all well, 4 stalled, 8 reconnected, 16 bytes
differ from the manifest, 32 gave up before the end; 1 when the watch could not
start at all.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from ferry.errors import FerryError

if TYPE_CHECKING:
    from ferry.stream.player import Status, WatchReport

STATUS_INTERVAL_S = 0.2


class StatusFile:
    """The latest status as JSON in a file, replaced atomically, for another
    program (``ferry demo``) to follow the player live."""

    INTERVAL = 0.1

    def __init__(self, path: Path) -> None:
        self.path = path
        self.tmp = path.with_name(path.name + ".tmp")
        self.last = 0.0

    def __call__(self, status: Status) -> None:
        now = time.monotonic()
        if now - self.last < self.INTERVAL:
            return
        self.last = now
        self.tmp.write_text(json.dumps(dataclasses.asdict(status)))
        self.tmp.replace(self.path)


def add_watch_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("url", metavar="URL", help="http://host:port/path of the media")
    parser.add_argument(
        "--status-file",
        type=Path,
        metavar="FILE",
        help="keep the live status here as JSON (for programs following the player)",
    )
    parser.add_argument(
        "--buffer",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="player buffer in seconds of media (default 10)",
    )
    parser.add_argument(
        "--prebuffer",
        type=float,
        default=2.0,
        metavar="SECONDS",
        help="seconds buffered before playback starts (default 2)",
    )
    parser.add_argument(
        "--resume",
        type=float,
        default=None,
        metavar="SECONDS",
        help="seconds buffered before playback resumes after a stall (default: --prebuffer)",
    )
    parser.add_argument(
        "--max-time",
        type=float,
        default=None,
        metavar="SECONDS",
        help="stop after this many seconds of wall time (default: play to the end)",
    )
    parser.add_argument(
        "--outage-min",
        type=float,
        default=0.5,
        metavar="SECONDS",
        help="a gap between received bytes at least this long is reported as an outage",
    )
    parser.add_argument(
        "--reconnect-window",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="give up when a broken connection cannot be resumed within this time",
    )
    parser.add_argument(
        "--sample-interval",
        type=float,
        default=0.1,
        metavar="SECONDS",
        help="how often the report's timeline samples the buffer and the bytes (default 0.1)",
    )
    parser.add_argument("--json", action="store_true", help="print the full report as JSON")
    parser.add_argument("--output", type=Path, metavar="FILE", help="write the JSON report here")


class StatusLine:
    """A single self-overwriting line on a terminal, at most a few times a second."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.last = 0.0
        self.width = 0

    def __call__(self, status: Status) -> None:
        now = time.monotonic()
        if now - self.last < STATUS_INTERVAL_S and status.state != "finished":
            return
        self.last = now
        line = format_status(status)
        pad = max(0, self.width - len(line))
        self.width = len(line)
        self.stream.write("\r" + line + " " * pad)
        self.stream.flush()

    def close(self) -> None:
        if self.width:
            self.stream.write("\n")
            self.stream.flush()


def format_status(s: Status) -> str:
    position = f"{s.played_s:6.1f}"
    if s.duration_s:
        position += f"/{s.duration_s:.1f}"
    total = f"/{s.total_bytes}" if s.total_bytes else ""
    return (
        f"{s.t_s:6.1f}s {s.state:<12} pos {position}s  buffer {s.buffer_s:5.2f}s  "
        f"{s.bytes_received}{total} B  stalls {s.stalls} ({s.stalled_s:.2f}s)  "
        f"reconnects {s.reconnects}  gap {s.gap_s * 1000:5.0f}ms"
    )


def summary(report: WatchReport) -> list[str]:
    lines = [
        f"{report.url}: {report.ended} after {report.elapsed_s:.1f} s, "
        f"played {report.played_s:.1f} s of {report.duration_s or 0:.1f} s",
        f"bytes {report.bytes_received} (expected {report.expected_size or '?'}), "
        f"checksum {report.checksum}",
        f"stalls {len(report.stalls)} ({report.stalled_s:.2f} s), "
        f"reconnects {report.reconnects}, longest gap {report.longest_gap_ms:.0f} ms",
    ]
    for stall in report.stalls:
        lines.append(f"  stall at {stall.start_s:.2f} s for {stall.duration_s:.2f} s")
    for o in report.outages:
        drained = (
            f"buffer ran dry after {o.drained_after_s:.2f} s"
            if o.drained_after_s is not None
            else "buffer held"
        )
        lines.append(
            f"  outage at {o.start_s:.2f} s: no data for {o.gap_s:.2f} s, "
            f"{o.buffer_s:.2f} s buffered, {drained}"
        )
    lines.extend(f"  note: {n}" for n in report.notes)
    if report.error:
        lines.append(f"  error: {report.error}")
    lines.append(f"exit status {report.exit_code}")
    return lines


async def _watch_until_stopped(
    args: argparse.Namespace, on_status: Callable[[Status], None]
) -> WatchReport:
    """The watch, ended early (with its report) by SIGTERM, as a player window closing."""
    import asyncio

    from ferry.stream.player import watch_async

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    # A request to stop, not a cancellation: the watch ends and still reports.
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    try:
        return await watch_async(
            args.url,
            buffer_seconds=args.buffer,
            prebuffer=args.prebuffer,
            timeout=args.max_time,
            on_status=on_status,
            resume=args.resume,
            outage_min=args.outage_min,
            reconnect_window=args.reconnect_window,
            stop=stop,
            sample_interval=args.sample_interval,
        )
    finally:
        loop.remove_signal_handler(signal.SIGTERM)


def run_watch(args: argparse.Namespace) -> int:
    # Here, not at the top: every `ferry` command builds this parser.
    import asyncio

    from ferry.stream.player import EXIT_ERROR

    status_stream = sys.stderr if args.json else sys.stdout
    status_line = StatusLine(status_stream) if status_stream.isatty() else None
    status_file = StatusFile(args.status_file) if args.status_file else None

    def on_status(status: Status) -> None:
        if status_line is not None:
            status_line(status)
        if status_file is not None:
            status_file(status)

    try:
        report = asyncio.run(_watch_until_stopped(args, on_status))
    except FerryError as err:
        if status_line is not None:
            status_line.close()
        print(f"ferry watch: {err}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        if status_line is not None:
            status_line.close()
        print("ferry watch: interrupted, no report", file=sys.stderr)
        return 130
    if status_line is not None:
        status_line.close()
    if args.output is not None:
        try:
            args.output.write_text(report.to_json() + "\n", encoding="utf-8")
        except OSError as err:
            print(f"ferry watch: cannot write report to {args.output}: {err}", file=sys.stderr)
            return EXIT_ERROR
    if args.json:
        print(report.to_json())
    else:
        print("\n".join(summary(report)))
    return report.exit_code


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ferry watch", description=__doc__)
    add_watch_arguments(parser)
    return run_watch(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
