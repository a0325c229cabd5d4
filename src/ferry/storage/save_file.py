"""A saved domain on disk (``ferry save`` / ``ferry restore``): a header, then QEMU's stream.

::

    0        "FERRY-SAVE 1\\n", then the header as one line of JSON, padded with NULs
    65536    QEMU's migration stream, written by QEMU itself (fd: migration)

The header carries the domain's config, its state when saved, what its disks
and boot files were (size, format, digests), and the stream's length and
SHA-256, written last: a file whose stream was cut short or changed, or that
is not a ferry save at all, is refused before any QEMU starts. The file holds
the guest's memory, secrets included: it is created 0600, never over an
existing file, never through a symlink.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ferry.errors import StorageError

MAGIC = b"FERRY-SAVE 1\n"
STREAM_OFFSET = 65536
FORMAT = 1


@dataclass
class SaveHeader:
    config: dict[str, Any]
    running: bool  # the domain ran when saved (else it was paused): restore does the same
    host: str
    saved_at: float
    disks: list[dict[str, Any]] = field(default_factory=list)
    boot: dict[str, Any] = field(default_factory=dict)
    qemu: str = ""  # the saving QEMU's version, for the error if another cannot load it
    stream_bytes: int = 0
    stream_sha256: str = ""  # empty until the stream is complete

    def encode(self) -> bytes:
        body = MAGIC + json.dumps({"format": FORMAT, **self.__dict__}).encode() + b"\n"
        if len(body) > STREAM_OFFSET:
            raise StorageError(f"the save header is {len(body)} bytes, over {STREAM_OFFSET}")
        return body.ljust(STREAM_OFFSET, b"\0")

    @classmethod
    def decode(cls, raw: bytes, where: str) -> SaveHeader:
        if not raw.startswith(MAGIC):
            raise StorageError(f"{where} is not a ferry save file (no FERRY-SAVE 1 header)")
        line = raw[len(MAGIC) :].split(b"\n", 1)[0]
        try:
            data = json.loads(line)
            if data.pop("format") != FORMAT:
                raise ValueError("another format version")
            header = cls(**data)
        except (ValueError, TypeError, KeyError) as err:
            raise StorageError(f"{where}: its header is damaged ({err})") from None
        if not isinstance(header.config, dict) or not isinstance(header.disks, list):
            raise StorageError(f"{where}: its header is damaged (config or disks)")
        return header


def create(path: Path) -> int:
    """A new save file, open for writing at the stream's offset; its header comes later."""
    if not path.is_absolute():
        raise StorageError(f"{path}: a save file's path must be absolute")
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except FileExistsError:
        raise StorageError(f"{path} exists already: ferry save never overwrites a file") from None
    except OSError as err:
        raise StorageError(f"cannot create {path}: {err.strerror}") from None
    os.lseek(fd, STREAM_OFFSET, os.SEEK_SET)
    return fd


def finish(fd: int, path: Path, header: SaveHeader) -> SaveHeader:
    """Measure the stream QEMU wrote, write the header, and make it all durable."""
    header.stream_bytes, header.stream_sha256 = _digest(fd)
    os.pwrite(fd, header.encode(), 0)
    os.fsync(fd)
    directory = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
    return header


def open_checked(path: Path) -> tuple[int, SaveHeader]:
    """The file open at its stream, and its header, once the stream's digest matches."""
    where = str(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as err:
        raise StorageError(f"cannot open {where}: {err.strerror}") from None
    try:
        header = SaveHeader.decode(os.pread(fd, STREAM_OFFSET, 0), where)
        if not header.stream_sha256:
            raise StorageError(f"{where} is incomplete: its save never finished")
        size, digest = _digest(fd)
        if (size, digest) != (header.stream_bytes, header.stream_sha256):
            raise StorageError(
                f"{where} is corrupt: its memory stream is {size} bytes with another checksum "
                f"than the {header.stream_bytes} bytes saved"
            )
        os.lseek(fd, STREAM_OFFSET, os.SEEK_SET)
    except BaseException:
        os.close(fd)
        raise
    return fd, header


def _digest(fd: int) -> tuple[int, str]:
    """Length and SHA-256 of the stream, read through ``fd`` (the very file QEMU gets)."""
    sha = hashlib.sha256()
    offset = STREAM_OFFSET
    while chunk := os.pread(fd, 1 << 20, offset):
        sha.update(chunk)
        offset += len(chunk)
    return offset - STREAM_OFFSET, sha.hexdigest()
