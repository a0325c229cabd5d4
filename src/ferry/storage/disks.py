"""Disk checks before QEMU opens anything: present, inside the storage roots, one writer."""

from __future__ import annotations

import os
import stat
from collections.abc import Collection, Iterable, Sequence
from pathlib import Path
from urllib.parse import urlsplit

from ferry.domain.config import DomainConfig
from ferry.domain.disks import DiskSpec
from ferry.errors import StorageError


def resolve_disk(disk: DiskSpec, roots: Sequence[Path]) -> str:
    """The canonical identity of a disk: its real path, or its URL as given."""
    if disk.is_url:
        return disk.path
    real = Path(os.path.realpath(disk.path))
    if not any(real == root or root in real.parents for root in _real_roots(roots)):
        where = ", ".join(str(r) for r in roots) or "none configured"
        raise StorageError(f"disk {disk.path} is outside this host's storage roots ({where})")
    try:
        info = real.stat()
    except FileNotFoundError:
        raise StorageError(f"disk {disk.path} does not exist") from None
    except OSError as err:
        raise StorageError(f"disk {disk.path} cannot be read: {err.strerror}") from None
    if not (stat.S_ISREG(info.st_mode) or stat.S_ISBLK(info.st_mode)):
        raise StorageError(f"disk {disk.path} is neither a regular file nor a block device")
    mode = os.R_OK | (os.W_OK if disk.writable else 0)
    if not os.access(real, mode):
        raise StorageError(f"disk {disk.path} is not {'writable' if disk.writable else 'readable'}")
    return str(real)


def _real_roots(roots: Sequence[Path]) -> list[Path]:
    return [Path(os.path.realpath(root)) for root in roots]


def check_url(disk: DiskSpec, servers: Sequence[str]) -> None:
    """A URL disk may only name a storage server the host config allows.

    QEMU opens the URL itself, with ferryd's rights: a URL naming a unix
    socket (``nbd+unix://...?socket=/run/ferry/ferryd.sock``) or any host the
    operator did not list would let a config reach what it should not.
    """
    url = urlsplit(disk.path)
    if url.scheme not in ("nfs", "nbd", "iscsi"):
        raise StorageError(f"disk {disk.path}: {url.scheme}:// disks are not allowed")
    if url.query and "socket" in url.query:
        raise StorageError(f"disk {disk.path}: a URL may not name a socket")
    host = (url.hostname or "").lower()
    if host not in servers:
        allowed = ", ".join(servers) or "none configured"
        raise StorageError(
            f"disk {disk.path}: {host or 'no host'} is not one of this host's storage servers "
            f"(storage_servers: {allowed})"
        )


def check_disks(
    cfg: DomainConfig,
    roots: Sequence[Path],
    in_use: Iterable[tuple[str, str]],
    servers: Sequence[str] = (),
    new: Collection[str] = (),
) -> None:
    """Refuse a config whose disks are missing, outside the roots or the allowed
    storage servers, or written by another domain.

    ``in_use`` holds (domain name, canonical disk identity) for the writable
    disks of the domains already on this host. ``new``: the paths of disks
    still to be made here (--copy-storage), checked where they are made.
    """
    users = dict((disk, name) for name, disk in in_use)
    for disk in cfg.disks:
        if disk.is_url:
            check_url(disk, servers)
        identity = os.path.realpath(disk.path) if disk.path in new else resolve_disk(disk, roots)
        owner = users.get(identity)
        if owner is not None and owner != cfg.name:
            raise StorageError(f"disk {disk.path} is already in use by domain '{owner}'")
