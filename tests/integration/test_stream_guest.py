"""The guest's media server, through ferry's networking, to real and measuring players."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time

import pytest

from ferry.lab import netns
from ferry.util.wait import wait_until_sync

from .conftest import LabHost

pytestmark = pytest.mark.integration
CLIP = "http://10.99.0.10:8888/clip.ogg"
MOVIE = "http://10.99.0.10:8888/movie.ogg"


def popen_in(host: LabHost, argv: list[str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        netns.popen_argv(host.ns, argv), text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )


def ferry_watch(host: LabHost, url: str, output: str, *extra: str) -> subprocess.Popen[str]:
    argv = [
        sys.executable,
        "-m",
        "ferry.cli.main",
        "watch",
        "--json",
        "--output",
        output,
        *extra,
        url,
    ]
    return popen_in(host, argv)


def wait_for_server(host: LabHost) -> None:
    probe = [
        sys.executable,
        "-c",
        f"import urllib.request as u; u.urlopen('{CLIP}.json', timeout=2)",
    ]
    wait_until_sync(
        lambda: netns.run(host.ns, probe).returncode == 0,
        timeout=60,
        interval=0.5,
        what="the media server to answer",
    )


def test_clip_plays_to_the_end_in_ferry_watch_and_in_ffmpeg(booted: LabHost) -> None:
    wait_for_server(booted)
    report_file = str(booted.workdir / "watch.json")
    player = ferry_watch(booted, CLIP, report_file)
    # A real player at the same time: ffmpeg reading at the native rate (-re).
    ffmpeg = popen_in(
        booted, ["ffmpeg", "-nostdin", "-hide_banner", "-re", "-i", CLIP, "-f", "null", "-"]
    )
    _, ffmpeg_err = ffmpeg.communicate(timeout=120)
    player.communicate(timeout=120)
    report = json.loads((booted.workdir / "watch.json").read_text())
    assert report["stalls"] == [] and report["reconnects"] == 0, report["notes"]
    assert report["checksum"] == "match"
    assert report["ended"] == "complete"
    assert player.returncode == 0
    assert ffmpeg.returncode == 0, ffmpeg_err[-2000:]
    times = re.findall(r"time=(\d+):(\d+):(\d+\.\d+)", ffmpeg_err)
    h, m, s = times[-1]
    played = int(h) * 3600 + int(m) * 60 + float(s)
    assert played >= 29.5, f"ffmpeg stopped at {played:.1f} s of a 30 s clip"


def test_a_pause_measures_the_players_buffer(booted: LabHost) -> None:
    """The classic step: pause the VM and watch the player run dry."""
    wait_for_server(booted)
    report_file = str(booted.workdir / "pause.json")
    status_file = booted.workdir / "pause.status"
    player = ferry_watch(
        booted, MOVIE, report_file, "--buffer", "10", "--max-time", "24",
        "--status-file", str(status_file),
    )  # fmt: skip

    def buffered(seconds: float) -> bool:
        try:
            status = json.loads(status_file.read_text())
        except (OSError, ValueError):
            return False
        return bool(status.get("state") == "playing" and status.get("buffer_s", 0) >= seconds)

    # The player has filled what the server lets it (it runs 4 s ahead).
    wait_until_sync(lambda: buffered(3.0), timeout=30, interval=0.1, what="a 3 s buffer")
    asked = time.monotonic()
    assert booted.ferry("pause", "virt_server")[0] == 0
    # The scenario's pause itself (not a wait on a state): longer than any
    # buffer the server allows.
    time.sleep(8)
    assert booted.ferry("unpause", "virt_server")[0] == 0
    # (Each command's own time counts too: a loaded CI machine takes seconds.)
    paused_at_most = time.monotonic() - asked
    player.communicate(timeout=60)
    report = json.loads((booted.workdir / "pause.json").read_text())
    (outage,) = [o for o in report["outages"] if o["gap_s"] > 2]
    assert 6 <= outage["gap_s"] <= paused_at_most + 2, (outage, paused_at_most)
    assert outage["stalled"] is True
    # The server runs 4 s ahead of real time; the player played that much on.
    assert 2.5 <= outage["drained_after_s"] <= 5.5, outage
    assert player.returncode == 4  # stalled, as a paused source must make it
