"""Disk leases: which host's domain may write a file-backed disk.

QEMU's network block drivers and shared file systems take no lock that the
other host would see, so ferry keeps its own: a small file beside the image,
``<image>.ferry-lease``, naming the host and domain that own the disk and a
random token. It is written when a domain is created, handed to the target
host in the migration commit, and removed when the domain ends. A host that
finds a lease held by another host refuses to start a domain on that disk.

The same file proves, during a migration, that the target sees the very same
image as the source (not a copy at the same path): it must read the token the
source sent.
"""

from __future__ import annotations

import json
import os
import secrets
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from ferry.errors import StorageError

SUFFIX = ".ferry-lease"


@dataclass(frozen=True)
class Lease:
    host: str
    domain: str
    token: str
    since: float


def lease_path(disk: str) -> Path:
    """Beside the disk's real file: a symlink or another spelling of the path is
    the same disk, so it must find the same lease."""
    return Path(os.path.realpath(disk) + SUFFIX)


def read_lease(disk: str) -> Lease | None:
    path = lease_path(disk)
    try:
        data = json.loads(path.read_text())
        return Lease(
            str(data["host"]), str(data["domain"]), str(data["token"]), float(data["since"])
        )
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise StorageError(f"disk lease {path} is unreadable or damaged: {err}") from err


def write_lease(disk: str, host: str, domain: str, token: str | None = None) -> Lease:
    lease = Lease(host, domain, token or secrets.token_hex(16), time.time())
    path = lease_path(disk)
    # Unpredictable and created exclusively: nobody can plant it beforehand.
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}")
    try:
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as f:
            json.dump(asdict(lease), f)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(path)
    except OSError as err:
        raise StorageError(f"cannot write disk lease {path}: {err.strerror}") from err
    return lease


def acquire(disk: str, host: str, domain: str) -> Lease:
    """Take the lease for a new domain; refuse one held by another host.

    The lease file is created with O_EXCL, so of two hosts racing for a free
    disk exactly one wins; a lease this host already holds is taken over.
    """
    lease = Lease(host, domain, secrets.token_hex(16), time.time())
    path = lease_path(disk)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        held = read_lease(disk)
        if held is not None and held.host != host:
            raise StorageError(
                f"disk {disk} is leased by domain '{held.domain}' on host {held.host}; if that "
                f"host is gone for good, remove {path}"
            ) from None
        return write_lease(disk, host, domain)
    except OSError as err:
        raise StorageError(f"cannot create disk lease {path}: {err.strerror}") from err
    with os.fdopen(fd, "w") as f:
        json.dump(asdict(lease), f)
        f.flush()
        os.fsync(f.fileno())
    return lease


def release(disk: str, host: str) -> None:
    held = read_lease(disk)
    if held is not None and held.host == host:
        lease_path(disk).unlink(missing_ok=True)
