"""The HTML pages: directory listings, statistics and search results."""

from __future__ import annotations

import html
import os
import time
import urllib.parse
from pathlib import Path
from typing import Any

from .mediatypes import is_streamable
from .paths import url_for

SEARCH_LIMIT = 500


def page(title: str, body: str) -> bytes:
    """A whole document around ``body`` (already HTML), with the site's links."""
    doc = (
        "<!DOCTYPE html>\n<html><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title></head><body>\n"
        f"<h1>{html.escape(title)}</h1>\n{body}\n"
        "<hr><p><a href='/'>home</a> | <a href='/_stats'>statistics</a> | "
        "<form style='display:inline' action='/_search'>"
        "<input name='q' placeholder='search'></form></p>\n</body></html>\n"
    )
    return doc.encode()


def directory_listing(root: Path, path: Path) -> str:
    """The entries of ``path`` with sizes and playlist links; OSError if unreadable."""
    entries = sorted(p for p in path.iterdir() if not p.name.startswith("."))
    rows = ["<p><a href='?m3u'>play all</a> | <a href='?m3u=shuffle'>shuffle all</a></p><ul>"]
    if path != root:
        rows.append("<li><a href='../'>../</a></li>")
    for entry in entries:
        try:
            is_dir = entry.is_dir()
            size = 0 if is_dir else entry.stat().st_size
        except OSError:
            continue
        href = html.escape(urllib.parse.quote(entry.name) + ("/" if is_dir else ""), True)
        label = html.escape(entry.name + ("/" if is_dir else ""))
        if is_dir:
            extra = f" [<a href='{href}?m3u'>play</a>]"
        elif is_streamable(entry.name):
            extra = f" {size} bytes [<a href='{href}?m3u'>play</a>]"
        else:
            extra = f" {size} bytes"
        rows.append(f"<li><a href='{href}'>{label}</a>{extra}</li>")
    rows.append("</ul>")
    return "\n".join(rows)


def stats_body(snap: dict[str, Any]) -> str:
    """The statistics page's body from :meth:`Stats.snapshot`."""
    most = (
        "".join(f"<li>{html.escape(p)}: {n}</li>" for p, n in snap["most_played"])
        or "<li>nothing yet</li>"
    )
    recent = (
        "".join(
            f"<li>{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(r['time']))} "
            f"{html.escape(str(r['client']))} {html.escape(str(r['path']))}</li>"
            for r in snap["recent"]
        )
        or "<li>nothing yet</li>"
    )
    return (
        f"<p>{snap['requests']} requests, {snap['bytes_sent']} bytes sent.</p>"
        f"<h2>Most played</h2><ol>{most}</ol><h2>Recently played</h2><ul>{recent}</ul>"
    )


def search(root: Path, term: str) -> list[Path]:
    """Files and directories whose name contains ``term`` (lower case), at most 500."""
    hits: list[Path] = []
    if not term:
        return hits
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(dirnames) + sorted(filenames):
            if term in name.lower():
                hits.append(Path(dirpath, name))
        if len(hits) >= SEARCH_LIMIT:
            break
    return hits[:SEARCH_LIMIT]


def search_body(root: Path, term: str, hits: list[Path]) -> str:
    items = "".join(
        f"<li><a href='{html.escape(url_for(root, p), True)}'>"
        f"{html.escape(p.relative_to(root).as_posix())}</a></li>"
        for p in hits
    )
    return f"<p>{len(hits)} matches for {html.escape(term)!s}</p><ul>{items}</ul>"
