"""Test media for the streaming demo, generated with Debian's ffmpeg.

The movie is synthetic (``testsrc2`` pattern, a sine tone) with the playback
time and frame number burnt into every frame, so a viewer or a screenshot shows
exactly where playback is. It is Theora + Vorbis in Ogg with short pages
(``-page_duration``) so that a player's progress, and any gap in it, is visible
at a fine grain. Beside ``<name>.ogg`` goes ``<name>.ogg.json``, the manifest
that the media server uses for pacing and the player for bytes-to-seconds and
the checksum.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ferry.errors import FerryError

# Bump whenever the recipe below changes: it is part of the guest image digest.
MEDIA_VERSION = "1"

WIDTH, HEIGHT, FPS = 320, 240, 25
VIDEO_BITRATE = "300k"
AUDIO_BITRATE = "64k"
AUDIO_RATE = 44100
# Microseconds of media per Ogg page: ten pages a second keeps progress fine-grained.
PAGE_DURATION_US = 100000
MEDIA_TYPE = "video/ogg"
FONT_CANDIDATES = (
    Path("/usr/share/fonts/truetype/dejavu/DejaVuSansMono-Bold.ttf"),
    Path("/usr/share/fonts/truetype/dejavu/DejaVuSansMono.ttf"),
    Path("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"),
)
FFMPEG_TIMEOUT_S = 600.0


class MediaError(FerryError):
    """Generating or describing test media failed."""


def find_font() -> Path | None:
    return next((f for f in FONT_CANDIDATES if f.is_file()), None)


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise MediaError(f"generate test media: {name} not found (apt-get install ffmpeg)")
    return path


def ffmpeg_args(out: Path, seconds: int, font: Path | None) -> list[str]:
    """The ffmpeg command line that renders the movie to ``out``."""
    video = f"testsrc2=size={WIDTH}x{HEIGHT}:rate={FPS}:duration={seconds}"
    audio = f"sine=frequency=440:beep_factor=4:sample_rate={AUDIO_RATE}:duration={seconds}"
    args = [
        _tool("ffmpeg"),
        "-hide_banner",
        "-nostdin",
        "-loglevel",
        "error",
        "-y",
        "-f",
        "lavfi",
        "-i",
        video,
        "-f",
        "lavfi",
        "-i",
        audio,
    ]
    if font is not None:
        # drawtext's own escaping: ':' separates options, so the pts format escapes it.
        text = "%{pts\\:hms}  frame %{n}"
        args += [
            "-vf",
            f"drawtext=fontfile={font}:text='{text}':x=8:y=8:fontsize=20"
            ":fontcolor=white:box=1:boxcolor=black@0.6:boxborderw=4",
        ]
    args += [
        "-c:v",
        "libtheora",
        "-b:v",
        VIDEO_BITRATE,
        "-g",
        str(FPS),
        "-c:a",
        "libvorbis",
        "-b:a",
        AUDIO_BITRATE,
        "-ac",
        "1",
        "-page_duration",
        str(PAGE_DURATION_US),
        "-f",
        "ogg",
        str(out),
    ]
    return args


def probe(path: Path) -> dict[str, Any]:
    """ffprobe's view of ``path`` (format and streams) as parsed JSON."""
    cmd = [
        _tool("ffprobe"),
        "-v",
        "error",
        "-show_format",
        "-show_streams",
        "-of",
        "json",
        str(path),
    ]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
    except subprocess.TimeoutExpired as err:
        raise MediaError(f"probe {path}: ffprobe did not finish within 60 s") from err
    if done.returncode != 0:
        raise MediaError(f"probe {path}: ffprobe failed: {done.stderr.strip()[:300]}")
    data: dict[str, Any] = json.loads(done.stdout)
    return data


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def manifest_path(media: Path) -> Path:
    return media.with_name(media.name + ".json")


def write_manifest(media: Path, media_type: str = MEDIA_TYPE) -> dict[str, Any]:
    """Describe ``media`` in ``<media>.json``: duration, size, sha256, streams."""
    info = probe(media)
    try:
        duration = float(info["format"]["duration"])
    except (KeyError, TypeError, ValueError) as err:
        raise MediaError(f"describe {media}: ffprobe reports no duration") from err
    streams = [
        {
            k: s[k]
            for k in ("codec_type", "codec_name", "width", "height", "sample_rate", "channels")
            if k in s
        }
        for s in info.get("streams", [])
    ]
    manifest: dict[str, Any] = {
        "name": media.name,
        "duration": duration,
        "size": media.stat().st_size,
        "sha256": sha256_file(media),
        "media_type": media_type,
        "streams": streams,
        "media_version": MEDIA_VERSION,
    }
    target = manifest_path(media)
    tmp = target.with_name(f".{target.name}.tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, target)
    return manifest


def generate_movie(
    dest_dir: Path,
    name: str = "movie",
    seconds: int = 90,
    log: Callable[[str], object] = print,
) -> Path:
    """Render ``<dest_dir>/<name>.ogg`` and its manifest; return the movie's path."""
    if seconds < 1:
        raise MediaError(f"generate test media {name}: duration must be >= 1 s, not {seconds}")
    dest_dir.mkdir(parents=True, exist_ok=True)
    out = dest_dir / f"{name}.ogg"
    partial = dest_dir / f".{name}.partial.ogg"
    font = find_font()
    if font is None:
        log("no DejaVu font found (apt-get install fonts-dejavu-core): movie without timestamp")
    log(f"rendering {seconds} s test movie to {out}")
    cmd = ffmpeg_args(partial, seconds, font)
    try:
        done = subprocess.run(
            cmd, capture_output=True, text=True, timeout=FFMPEG_TIMEOUT_S, check=False
        )
    except subprocess.TimeoutExpired as err:
        partial.unlink(missing_ok=True)
        raise MediaError(
            f"generate test media {out}: ffmpeg did not finish within {FFMPEG_TIMEOUT_S:.0f} s"
        ) from err
    if done.returncode != 0:
        partial.unlink(missing_ok=True)
        reason = done.stderr.strip().splitlines()[-1:] or [f"exit status {done.returncode}"]
        raise MediaError(f"generate test media {out}: ffmpeg failed: {reason[0]}")
    os.replace(partial, out)
    manifest = write_manifest(out)
    log(
        f"{out.name}: {manifest['duration']:.2f} s, {manifest['size']} bytes, "
        f"sha256 {manifest['sha256'][:16]}..."
    )
    return out
