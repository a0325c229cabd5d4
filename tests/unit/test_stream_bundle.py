"""The media server as the guest gets it: one zipapp, standard library only."""

from __future__ import annotations

import ast
import http.client
import io
import re
import signal
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from ferry.guest import image
from ferry.stream import bundle
from ferry.util.wait import wait_until_sync

BODY = bytes(range(256)) * 40  # 10240 bytes, every offset recognisable
# The guest's own interpreter where there is one, as the guest runs it.
PYTHON = "/usr/bin/python3" if Path("/usr/bin/python3").exists() else sys.executable


@pytest.fixture
def app(tmp_path: Path) -> Path:
    path = tmp_path / "ferry-media-server"
    path.write_bytes(bundle.media_server_zipapp())
    return path


def test_the_archive_is_the_same_on_every_build() -> None:
    first = bundle.media_server_zipapp()
    assert bundle.media_server_zipapp() == first
    assert first.startswith(b"#!/usr/bin/python3\n")
    names = zipfile.ZipFile(io.BytesIO(first)).namelist()
    assert names == sorted(names)
    assert "__main__.py" in names and "mediaserver/cli.py" in names
    sources = bundle.package_sources()
    assert {f"mediaserver/{n}" for n in sources} | {"__main__.py"} == set(names)


def test_the_image_ships_the_zipapp_under_the_old_name() -> None:
    assert image.guest_files()["ferry-media-server"] == bundle.media_server_zipapp()


def test_the_package_imports_only_the_standard_library_and_itself() -> None:
    outside: list[str] = []
    for name, source in bundle.package_sources().items():
        for node in ast.walk(ast.parse(source, filename=name)):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                modules = [node.module or ""]
            else:
                continue
            top = {m.split(".")[0] for m in modules}
            outside += [f"{name}: {m}" for m in top - sys.stdlib_module_names - {"__future__"}]
    assert outside == []


def test_the_zipapp_serves_a_range_on_plain_python_and_stops_on_sigterm(
    app: Path, tmp_path: Path
) -> None:
    root = tmp_path / "media"
    root.mkdir()
    (root / "movie.ogg").write_bytes(BODY)
    log = tmp_path / "access.log"
    # -I as the guest runs it; -S as well, so that no site-packages (where ferry
    # may be installed) can stand in for a module missing from the archive.
    args = [PYTHON, "-I", "-S", str(app), "--bind", "127.0.0.1", "--port", "0"]
    args += ["--root", str(root), "--access-log", str(log)]
    proc = subprocess.Popen(args, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline()
        match = re.search(r"on 127\.0\.0\.1:(\d+)", line)
        assert match, line
        conn = http.client.HTTPConnection("127.0.0.1", int(match.group(1)), timeout=5)
        conn.request("GET", "/movie.ogg", headers={"Range": "bytes=100-199"})
        resp = conn.getresponse()
        assert resp.status == 206
        assert resp.getheader("Content-Range") == f"bytes 100-199/{len(BODY)}"
        assert resp.getheader("Content-Type") == "video/ogg"
        assert resp.read() == BODY[100:200]
        conn.close()
        wait_until_sync(
            lambda: (
                log.exists() and log.read_text().endswith('"GET /movie.ogg HTTP/1.1" 206 100\n')
            ),
            timeout=5,
            what="the access log line of the ranged request",
        )
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
        assert "Traceback" not in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
        if proc.stderr is not None:
            proc.stderr.close()
