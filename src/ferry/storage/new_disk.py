"""Disks this host makes itself: never over an existing file, never half-written in place.

A migration with ``--copy-storage`` makes the arriving domain's disks here,
empty and of the source's size and format, for the source to mirror into.
Such a disk belongs to the migration until its commit: an abort removes it,
and only a disk this host created for that migration is ever removed.
"""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from ferry.domain.config import DomainConfig
from ferry.domain.disks import FORMATS, DiskSpec
from ferry.errors import StorageError
from ferry.storage.images import qemu_img

# Room kept free beyond what the source's image takes (metadata, the guest
# writing while the mirror runs): a disk that fills its host's file system
# stops the guest with I/O errors.
FREE_MARGIN = 256 << 20


def copied_disks(cfg: DomainConfig) -> list[DiskSpec]:
    """The disks a --copy-storage migration copies: every writable file disk.

    A URL names storage both hosts reach; a read-only disk must be found on
    the target as it is (the same check as the boot files' images).
    """
    return [d for d in cfg.disks if d.writable and not d.is_url]


def write_new_disk(dest: Path, write: Callable[[Path], None]) -> None:
    """``write`` a disk into a temporary name beside ``dest``, then link it into place:
    never over an existing file, never a half-written disk at ``dest``."""
    tmp = _temporary(dest)
    try:
        try:
            write(tmp)
        except OSError as err:
            raise StorageError(f"creating disk {dest}: {err.strerror or err}") from err
        _link_into_place(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def _temporary(dest: Path) -> Path:
    if not dest.parent.is_dir():
        raise StorageError(f"creating disk {dest}: directory {dest.parent} does not exist")
    if dest.exists() or dest.is_symlink():
        raise StorageError(f"creating disk {dest}: file exists, refusing to overwrite it")
    return dest.with_name(f".{dest.name}.part-{secrets.token_hex(4)}")


def _link_into_place(tmp: Path, dest: Path) -> None:
    try:
        # link() fails if dest appeared meanwhile, where rename() would clobber it.
        os.link(tmp, dest)
    except FileExistsError as err:
        raise StorageError(f"creating disk {dest}: file exists, refusing to overwrite it") from err
    except OSError as err:
        raise StorageError(f"creating disk {dest}: {err.strerror or err}") from err


def check_new_disk(disk: DiskSpec, roots: Sequence[Path], need_bytes: int) -> str:
    """Where this host would make ``disk`` (its real path), or why it cannot.

    The file must not exist: one that does is another disk (or the very same
    disk, on storage both hosts share, which needs no copy at all).
    """
    path = Path(disk.path)
    parent = Path(os.path.realpath(path.parent))
    real = parent / path.name
    if not any(parent == r or r in parent.parents for r in map(_real, roots)):
        where = ", ".join(str(r) for r in roots) or "none configured"
        raise StorageError(f"disk {disk.path} would be outside this host's storage roots ({where})")
    if os.path.lexists(real):
        raise StorageError(
            f"disk {disk.path} exists here already: a copy is made only where there is no "
            "file (on storage both hosts share, migrate without --copy-storage)"
        )
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise StorageError(f"disk {disk.path}: directory {parent} is missing or not writable")
    free = shutil.disk_usage(parent).free
    if free < need_bytes + FREE_MARGIN:
        raise StorageError(
            f"disk {disk.path}: {free >> 20} MiB free in {parent}, the copy needs "
            f"{(need_bytes + FREE_MARGIN) >> 20} MiB"
        )
    return str(real)


async def create_image(path: str, fmt: str, size: int) -> None:
    """An empty image of exactly ``size`` bytes (a mirror wants the very same length)."""
    if fmt not in FORMATS or size <= 0:
        raise StorageError(f"creating disk {path}: a {fmt} image of {size} bytes is not possible")
    dest = Path(path)
    tmp = _temporary(dest)
    options = ["-o", "compat=1.1"] if fmt == "qcow2" else []
    try:
        rc, _, err = await qemu_img(
            ["create", "-q", "-f", fmt, *options, str(tmp), str(size)], f"creating disk {path}"
        )
        if rc != 0:
            raise StorageError(f"creating disk {path}: {err}")
        _link_into_place(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def remove_new_disks(paths: Iterable[str]) -> list[str]:
    """Remove disks this host made for a migration that did not commit; the errors."""
    errors = []
    for path in paths:
        try:
            Path(path).unlink(missing_ok=True)
        except OSError as err:
            errors.append(f"cannot remove {path}: {err.strerror}")
    return errors


def _real(root: Path) -> Path:
    return Path(os.path.realpath(root))
