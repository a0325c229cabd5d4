"""Test media generation with Debian's ffmpeg (skipped where ffmpeg is absent)."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import threading
from pathlib import Path

import pytest

from ferry.stream import media
from ferry.stream.mediaserver import Config, MediaServer, ogg_duration
from ferry.stream.player import watch

needs_ffmpeg = pytest.mark.skipif(
    shutil.which("ffmpeg") is None or shutil.which("ffprobe") is None,
    reason="ffmpeg/ffprobe not installed (apt-get install -y ffmpeg)",
)


def test_command_line_is_an_argument_list_with_short_pages() -> None:
    font = Path("/usr/share/fonts/truetype/dejavu/DejaVuSansMono-Bold.ttf")
    if shutil.which("ffmpeg") is None:
        pytest.skip("ffmpeg not installed")
    args = media.ffmpeg_args(Path("/tmp/x.ogg"), 60, font)
    assert args[args.index("-page_duration") + 1] == str(media.PAGE_DURATION_US)
    assert args[args.index("-c:v") + 1] == "libtheora"
    assert args[args.index("-c:a") + 1] == "libvorbis"
    assert any("drawtext" in a and "frame %{n}" in a for a in args)
    assert "duration=60" in args[args.index("-i") + 1]


@needs_ffmpeg
def test_generated_movie_and_manifest(tmp_path: Path) -> None:
    lines: list[str] = []
    movie = media.generate_movie(tmp_path, name="clip", seconds=5, log=lines.append)
    assert movie == tmp_path / "clip.ogg" and lines
    manifest = json.loads((tmp_path / "clip.ogg.json").read_text())
    data = movie.read_bytes()
    assert manifest["size"] == len(data)
    assert manifest["sha256"] == hashlib.sha256(data).hexdigest()
    assert manifest["duration"] == pytest.approx(5.0, abs=0.1)
    assert manifest["media_type"] == "video/ogg"
    assert manifest["media_version"] == media.MEDIA_VERSION
    codecs = {s["codec_type"]: s["codec_name"] for s in manifest["streams"]}
    assert codecs == {"video": "theora", "audio": "vorbis"}
    # Light enough that a 100 Mbit link is never the bottleneck, heavy enough to pace.
    kbit_s = len(data) * 8 / manifest["duration"] / 1000
    assert 150 <= kbit_s <= 600
    # Short pages: about ten Ogg pages per second of media in each stream.
    assert data.count(b"OggS") >= 5 * 10
    # The server's own duration probe agrees with ffprobe.
    assert ogg_duration(movie) == pytest.approx(manifest["duration"], abs=0.1)
    assert not list(tmp_path.glob(".*"))


@needs_ffmpeg
def test_frames_carry_a_burnt_in_timestamp(tmp_path: Path) -> None:
    if media.find_font() is None:
        pytest.skip("no DejaVu font (apt-get install fonts-dejavu-core)")
    movie = media.generate_movie(tmp_path, seconds=2, log=lambda _m: None)
    plain = tmp_path / "plain.ogg"
    args = media.ffmpeg_args(plain, 2, None)
    subprocess.run(args, check=True, capture_output=True, timeout=120)

    def frame(path: Path) -> bytes:
        cmd = ["ffmpeg", "-v", "error", "-ss", "1", "-i", str(path), "-frames:v", "1"]
        cmd += ["-vf", "crop=200:24:0:0", "-f", "rawvideo", "-pix_fmt", "gray", "-"]
        return subprocess.run(cmd, check=True, capture_output=True, timeout=60).stdout

    # The top-left corner differs from the bare test pattern: the text box is there.
    with_text, without = frame(movie), frame(plain)
    assert len(with_text) == len(without) == 200 * 24
    differing = sum(1 for a, b in zip(with_text, without, strict=True) if abs(a - b) > 40)
    assert differing > 200 * 24 // 4


def test_missing_ffmpeg_is_a_ferry_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr("ferry.stream.media.shutil.which", lambda _name: None)
    with pytest.raises(media.MediaError, match="ffmpeg not found"):
        media.generate_movie(tmp_path, seconds=1, log=lambda _m: None)


@needs_ffmpeg
def test_generated_movie_plays_through_the_server_without_a_stall(tmp_path: Path) -> None:
    media.generate_movie(tmp_path, seconds=2, log=lambda _m: None)
    server = MediaServer(Config(root=tmp_path, bind="127.0.0.1", port=0, pace=1.0, burst=1.0))
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        url = f"http://{server.address()}/movie.ogg"
        report = watch(url, buffer_seconds=3.0, prebuffer=0.5)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
    assert report.ended == "complete" and report.duration_source == "manifest"
    assert report.checksum == "match" and report.stalls == [] and report.exit_code == 0
    # Paced: the movie arrived over about its duration minus the burst, not at once.
    arrived = next(t for t, _level, n in report.timeline if n == report.bytes_received)
    assert arrived >= 0.7
