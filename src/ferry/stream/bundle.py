"""The guest's media server as one file: a zipapp of :mod:`ferry.stream.mediaserver`.

The guest image installs it as ``/usr/local/bin/ferry-media-server`` and runs it
with ``python3 -I``. Its bytes are part of the image digest, so the archive
is built deterministically: members in name order, one fixed timestamp and
mode, stored uncompressed (no dependence on the host's zlib).
"""

from __future__ import annotations

import io
import zipapp
import zipfile
from importlib import resources
from importlib.resources.abc import Traversable

# The package's name inside the archive; its modules import each other relatively.
ARCHIVE_PACKAGE = "mediaserver"
INTERPRETER = "/usr/bin/python3"
# The earliest time a zip member can carry.
FIXED_DATE = (1980, 1, 1, 0, 0, 0)
FILE_MODE = 0o644

MAIN = f'''"""ferry-media-server: the zipapp's entry point (built by ferry.stream.bundle)."""

import sys

from {ARCHIVE_PACKAGE}.cli import main

sys.exit(main())
'''


def package_sources() -> dict[str, bytes]:
    """The package's modules by file name, read as installed (checkout or wheel)."""
    package: Traversable = resources.files("ferry.stream.mediaserver")
    return {
        entry.name: entry.read_bytes()
        for entry in package.iterdir()
        if entry.is_file() and entry.name.endswith(".py")
    }


def _member(name: str) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name, date_time=FIXED_DATE)
    info.compress_type = zipfile.ZIP_STORED
    info.external_attr = (0o100000 | FILE_MODE) << 16  # a regular file, rw-r--r--
    info.create_system = 3  # Unix, so that the mode above is honoured
    return info


def media_server_zipapp() -> bytes:
    """The zipapp, with a ``#!/usr/bin/python3`` line; the same bytes on every build."""
    members = {f"{ARCHIVE_PACKAGE}/{name}": data for name, data in package_sources().items()}
    members["__main__.py"] = MAIN.encode()
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as zf:
        for name in sorted(members):
            zf.writestr(_member(name), members[name])
    archive.seek(0)
    app = io.BytesIO()
    # zipapp adds the interpreter line in front of the archive we built ourselves.
    zipapp.create_archive(archive, app, interpreter=INTERPRETER)
    return app.getvalue()
