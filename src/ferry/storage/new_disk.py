"""Disks this host makes itself: never over an existing file, never half-written in place.

A migration with ``--copy-storage`` makes the arriving domain's disks here,
empty and of the source's size and format, for the source to mirror into.
Such a disk belongs to the migration until its commit: an abort removes it,
and only a disk this host created for that migration is ever removed.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import stat
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ferry.domain.config import DomainConfig
from ferry.domain.disks import FORMATS, DiskSpec
from ferry.errors import StorageError
from ferry.storage.images import qemu_img

# Room kept free beyond what the source's image takes (metadata, the guest
# writing while the mirror runs): a disk that fills its host's file system
# stops the guest with I/O errors.
FREE_MARGIN = 256 << 20
# A temporary image's name: ``.<disk>.part-<token>``, beside the disk it becomes.
PART_MARK = ".part-"
_PART_NAME = re.compile(r"\..+\.part-[0-9a-f]{8}")


@dataclass(frozen=True)
class MadeDisk:
    """A disk this host made: its real path, and the very file (device and inode).

    Removal compares the file found at the path with this one, so a record
    that outlived its disk (a later disk at the same path, a path that leads
    elsewhere now) never removes anything but the file this host made.
    (A file system may give a removed file's inode number to a later file:
    that is why records are also removed with the arrivals they describe.)
    """

    path: str
    dev: int
    ino: int

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "dev": self.dev, "ino": self.ino}

    @classmethod
    def from_json(cls, data: Any) -> MadeDisk:
        if isinstance(data, str):
            # A record from before identities were kept: never removed blindly.
            return cls(data, -1, -1)
        return cls(str(data["path"]), int(data["dev"]), int(data["ino"]))


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
    return dest.with_name(f".{dest.name}{PART_MARK}{secrets.token_hex(4)}")


def _link_into_place(tmp: Path, dest: Path) -> None:
    try:
        # link() fails if dest appeared meanwhile, where rename() would clobber it.
        os.link(tmp, dest)
    except FileExistsError as err:
        raise StorageError(f"creating disk {dest}: file exists, refusing to overwrite it") from err
    except OSError as err:
        raise StorageError(f"creating disk {dest}: {err.strerror or err}") from err


def check_new_disk(
    disk: DiskSpec, roots: Sequence[Path], need_bytes: int, reserved: dict[int, int] | None = None
) -> str:
    """Where this host would make ``disk`` (its real path), or why it cannot.

    The file must not exist: one that does is another disk (or the very same
    disk, on storage both hosts share, which needs no copy at all).
    ``reserved``: bytes already promised on each file system (by device), to
    the disks checked before this one; this disk's share is added.
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
    promised = reserved if reserved is not None else {}
    device = parent.stat().st_dev
    need = need_bytes + promised.get(device, 0)
    free = shutil.disk_usage(parent).free
    if free < need + FREE_MARGIN:
        also = " (with the disks before it)" if need != need_bytes else ""
        raise StorageError(
            f"disk {disk.path}: {free >> 20} MiB free in {parent}, the copy needs "
            f"{(need + FREE_MARGIN) >> 20} MiB{also}"
        )
    promised[device] = need
    return str(real)


async def create_image(path: str, fmt: str, size: int) -> MadeDisk:
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
        try:
            # The temporary name is ours alone: its inode is the file we made.
            made = os.lstat(tmp)
        except OSError as err:
            raise StorageError(f"creating disk {path}: {err.strerror or err}") from err
        _link_into_place(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return MadeDisk(str(dest), made.st_dev, made.st_ino)


def remove_made_disk(disk: MadeDisk) -> str | None:
    """Remove ``disk`` if the file at its path is still the one made; why not, if not.

    The name is looked up and unlinked in one opened directory, never through
    a symbolic link in its last component: what is removed is what was compared.
    """
    path = Path(disk.path)
    try:
        dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    except FileNotFoundError:
        return None
    except OSError as err:
        return f"cannot remove {disk.path}: {err.strerror}"
    try:
        try:
            found = os.stat(path.name, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            return None
        if not stat.S_ISREG(found.st_mode) or (found.st_dev, found.st_ino) != (disk.dev, disk.ino):
            return f"{disk.path} is no longer the disk this host made for it: left as it is"
        os.unlink(path.name, dir_fd=dir_fd)
        return None
    except OSError as err:
        return f"cannot remove {disk.path}: {err.strerror}"
    finally:
        os.close(dir_fd)


def remove_part_files(roots: Sequence[Path], older_than_s: float, depth: int = 2) -> list[str]:
    """Temporary images a crash left in the storage roots (``depth`` levels down); the removed.

    Only files older than ``older_than_s``: another host sharing a root may
    be making one right now.
    """
    removed = []
    horizon = time.time() - older_than_s
    for root in roots:
        base = len(Path(root).parts)
        for directory, subdirs, files in os.walk(root):
            if len(Path(directory).parts) - base >= depth:
                subdirs.clear()
            for name in files:
                if not _PART_NAME.fullmatch(name):
                    continue
                path = os.path.join(directory, name)
                try:
                    found = os.lstat(path)
                    if stat.S_ISREG(found.st_mode) and found.st_mtime < horizon:
                        os.unlink(path)
                        removed.append(path)
                except OSError:
                    continue
    return removed


def _real(root: Path) -> Path:
    return Path(os.path.realpath(root))
