"""The guest's media server as one file: a zipapp of :mod:`ferry.stream.mediaserver`.

The guest image installs it as ``/usr/local/bin/ferry-media-server`` and runs it
with ``python3 -I``. Its bytes are part of the image digest, so the archive
is built deterministically (:mod:`ferry.util.zipapp`).
"""

from __future__ import annotations

from importlib import resources
from importlib.resources.abc import Traversable

from ferry.util import zipapp

# The package's name inside the archive; its modules import each other relatively.
ARCHIVE_PACKAGE = "mediaserver"
INTERPRETER = "/usr/bin/python3"

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


def media_server_zipapp() -> bytes:
    """The zipapp, with a ``#!/usr/bin/python3`` line; the same bytes on every build."""
    members = {f"{ARCHIVE_PACKAGE}/{name}": data for name, data in package_sources().items()}
    members["__main__.py"] = MAIN.encode()
    return zipapp.build(members, INTERPRETER)
