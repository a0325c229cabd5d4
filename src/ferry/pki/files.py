"""Writing PKI files: whole or not at all, with the permissions their secrecy needs."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from ferry.errors import PkiError

# What a credentials directory holds, for a host or an operator alike.
BUNDLE_FILES = ("ca.pem", "crl.pem", "cert.pem", "key.pem")


def _write(path: Path, data: bytes, mode: int) -> None:
    # A random temp name (mkstemp, O_EXCL) in the same directory, then rename:
    # a reader sees the old file or the new one, never half of one.
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    except OSError as err:
        raise PkiError(f"cannot write {path}: {err.strerror}") from None
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_private(path: Path, data: bytes) -> None:
    _write(path, data, 0o600)


def write_public(path: Path, data: bytes) -> None:
    _write(path, data, 0o644)
