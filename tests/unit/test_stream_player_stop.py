"""Ending a watch early: a stop request still reports, a cancellation propagates."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from ferry.stream.player import PlayState, Status, watch_async
from ferry.util.wait import wait_until, wait_until_sync

from .fault_http import Faults, fault_server

MEDIA = os.urandom(100_000)


def long_stream() -> Faults:
    """10 s of media at its real-time rate: every watch here is ended long before that."""
    return Faults(rate=10_000.0, burst=5_000)


def watch_tasks() -> list[str]:
    return sorted(t.get_name() for t in asyncio.all_tasks() if t.get_name().startswith("watch "))


async def test_cancelling_a_watch_propagates_and_leaves_no_task() -> None:
    statuses: list[Status] = []
    with fault_server(MEDIA, 10.0, long_stream()) as url:
        task = asyncio.create_task(
            watch_async(url, buffer_seconds=2.0, prebuffer=0.2, on_status=statuses.append),
            name="player under test",
        )
        await wait_until(
            lambda: any(s.state == PlayState.PLAYING for s in statuses),
            timeout=10,
            what="playback",
        )
        assert watch_tasks() == [f"watch fetcher {url}", f"watch stop {url}", f"watch ticker {url}"]
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert task.cancelled()
    assert watch_tasks() == []


async def test_a_stop_request_ends_the_watch_with_its_report() -> None:
    statuses: list[Status] = []
    stop = asyncio.Event()
    with fault_server(MEDIA, 10.0, long_stream()) as url:
        task = asyncio.create_task(
            watch_async(
                url, buffer_seconds=2.0, prebuffer=0.2, on_status=statuses.append, stop=stop
            ),
            name="player under test",
        )
        await wait_until(
            lambda: any(s.state == PlayState.PLAYING for s in statuses),
            timeout=10,
            what="playback",
        )
        stop.set()
        report = await task
    assert report.ended == "stopped"
    assert 0 < report.bytes_received < len(MEDIA)
    assert report.playback_started_s is not None and report.played_s > 0
    assert report.checksum == "unverified" and report.stalls == []
    assert report.exit_code == 0
    assert watch_tasks() == []


def test_sigterm_ends_ferry_watch_with_its_json_report(tmp_path: Path) -> None:
    status_file = tmp_path / "status.json"
    with fault_server(MEDIA, 10.0, long_stream()) as url:
        args = [sys.executable, "-m", "ferry.stream.watch_cli", url, "--json"]
        args += ["--buffer", "2", "--prebuffer", "0.2", "--status-file", str(status_file)]
        proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:

            def playing() -> bool:
                try:
                    return bool(json.loads(status_file.read_text())["state"] == "playing")
                except (OSError, ValueError):
                    return False

            wait_until_sync(playing, timeout=20, what="the player's status 'playing'")
            proc.send_signal(signal.SIGTERM)
            out, err = proc.communicate(timeout=10)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate(timeout=5)
    assert proc.returncode == 0, err
    report = json.loads(out)
    assert report["ended"] == "stopped" and report["exit_code"] == 0
    assert 0 < report["bytes_received"] < len(MEDIA)
