"""From a request path to a file under the media root, and back to a URL."""

from __future__ import annotations

import urllib.parse
from http import HTTPStatus
from pathlib import Path


class Refused(Exception):
    """The path cannot be served; ``status`` and ``reason`` are the answer to send."""

    def __init__(self, status: HTTPStatus, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


def resolve(root: Path, raw_path: str) -> Path:
    """The existing file or directory under ``root`` that ``raw_path`` names, or Refused.

    ``root`` must be resolved already: a symbolic link may point anywhere, and
    only targets inside the root are served.
    """
    try:
        decoded = urllib.parse.unquote(raw_path, errors="strict")
    except UnicodeDecodeError:
        raise Refused(HTTPStatus.BAD_REQUEST, "Bad path encoding") from None
    if "\x00" in decoded or "\\" in decoded:
        raise Refused(HTTPStatus.BAD_REQUEST, "Bad path")
    parts = [p for p in decoded.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise Refused(HTTPStatus.FORBIDDEN, "Path outside the media root")
    try:
        real = root.joinpath(*parts).resolve()
    except (OSError, RuntimeError):
        raise Refused(HTTPStatus.NOT_FOUND, "Not found") from None
    if real != root and root not in real.parents:
        raise Refused(HTTPStatus.FORBIDDEN, "Path outside the media root")
    if not real.exists():
        raise Refused(HTTPStatus.NOT_FOUND, "Not found")
    return real


def url_for(root: Path, path: Path) -> str:
    """The quoted URL path of ``path``; directories end in a slash."""
    rel = path.relative_to(root).as_posix()
    quoted = urllib.parse.quote("/" + rel if rel != "." else "/")
    return quoted + ("/" if path.is_dir() and not quoted.endswith("/") else "")


def absolute_url(host: str | None, fallback_host: str, root: Path, path: Path) -> str:
    """``http://host/path``, with the request's Host header unless it looks forged."""
    if not host or any(c in host for c in " /\\\r\n"):
        host = fallback_host
    return f"http://{host}{url_for(root, path)}"
