"""Media types by file name, and which files are media (paced, counted as plays)."""

from __future__ import annotations

import mimetypes
import os

# Explicit, because the guest's /etc/mime.types may lack or differ on these.
MEDIA_TYPES: dict[str, str] = {
    ".ogg": "video/ogg",
    ".ogv": "video/ogg",
    ".oga": "audio/ogg",
    ".opus": "audio/ogg",
    ".spx": "audio/ogg",
    ".mp3": "audio/mpeg",
    ".flac": "audio/flac",
    ".wav": "audio/wav",
    ".webm": "video/webm",
    ".mkv": "video/x-matroska",
    ".mka": "audio/x-matroska",
    ".mp4": "video/mp4",
    ".m4v": "video/mp4",
    ".m4a": "audio/mp4",
    ".aac": "audio/aac",
    ".wma": "audio/x-ms-wma",
    ".avi": "video/x-msvideo",
    ".mpg": "video/mpeg",
    ".mpeg": "video/mpeg",
    ".ts": "video/mp2t",
    ".m3u": "audio/x-mpegurl",
    ".m3u8": "application/vnd.apple.mpegurl",
    ".pls": "audio/x-scpls",
    ".json": "application/json",
    ".txt": "text/plain; charset=utf-8",
    ".html": "text/html; charset=utf-8",
    ".jpg": "image/jpeg",
    ".png": "image/png",
}


def media_type(path: str) -> str:
    ext = os.path.splitext(path)[1].lower()
    if ext in MEDIA_TYPES:
        return MEDIA_TYPES[ext]
    guessed, _ = mimetypes.guess_type(path)
    return guessed or "application/octet-stream"


def is_streamable(path: str) -> bool:
    """Audio and video are paced and counted as plays; everything else is not."""
    kind = media_type(path)
    return kind.startswith(("audio/", "video/")) and not kind.startswith("audio/x-mpegurl")
