"""``.m3u`` playlists: the media files of a tree, in order or shuffled."""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from pathlib import Path

from .mediatypes import is_streamable


def walk_media(root: Path, top: Path) -> list[Path]:
    """Media files under ``top``, sorted per directory, hidden ones and escapes left out."""
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(top, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            full = Path(dirpath, name)
            real = full.resolve()
            if is_streamable(name) and (root in real.parents) and real.is_file():
                found.append(full)
    return found


def m3u(files: list[Path], url_of: Callable[[Path], str], shuffle: bool) -> bytes:
    """An extended M3U playlist of ``files``, each under its absolute URL."""
    if shuffle:
        files = list(files)
        random.shuffle(files)
    lines = ["#EXTM3U"]
    for f in files:
        lines.append(f"#EXTINF:-1,{f.stem}")
        lines.append(url_of(f))
    return ("\n".join(lines) + "\n").encode()


def safe_name(name: str) -> str:
    """A playlist's file name for Content-Disposition: no quotes, no separators."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name) or "playlist"
