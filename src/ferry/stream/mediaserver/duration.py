"""How long a media file plays: from its manifest, else from its Ogg pages."""

from __future__ import annotations

import json
import os
import struct
import threading
from pathlib import Path

MANIFEST_SUFFIX = ".json"
OGG_SUFFIXES = (".ogg", ".ogv", ".oga", ".opus")
# The identification headers are on the first pages, the last granule on the last ones.
HEAD_BYTES = 65536
TAIL_BYTES = 262144


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
            head = f.read(HEAD_BYTES)
            size = f.seek(0, os.SEEK_END)
            f.seek(max(0, size - TAIL_BYTES))
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
        if duration is None and path.suffix.lower() in OGG_SUFFIXES:
            duration = ogg_duration(path)
        with self._lock:
            self._cache[key] = duration
        return duration
