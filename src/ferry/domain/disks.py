"""A domain's disks: what each one is, and the checks of its config table.

Canonical keys of one disk::

    path     str, absolute file path or nbd://, nfs://, iscsi:// URL
    target   str, xvdX/vdX/sdX/hdX (default: xvda, xvdb, ... by position)
    mode     "w" | "r"
    format   "raw" | "qcow2" or absent: read from the image itself at create,
             then pinned in the running domain's config
    cache    one of CACHE_MODES or absent: "none" (O_DIRECT), the mode that is
             safe to live-migrate on storage shared between hosts
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from ferry.errors import ConfigError

TARGET_RE = re.compile(r"(xvd|vd|sd|hd)[a-z]")
URL_SCHEMES = ("nbd://", "nbd+unix://", "nfs://", "iscsi://")
FORMATS = ("raw", "qcow2")
# QEMU's -drive cache= modes. "none" and "directsync" bypass the host's page
# cache (O_DIRECT); the others keep data in it, which two hosts sharing a
# file system do not see in common.
CACHE_MODES = ("none", "directsync", "writethrough", "writeback", "unsafe")
DIRECT_CACHE_MODES = ("none", "directsync")
DEFAULT_CACHE = "none"
DISK_KEYS = frozenset({"path", "target", "mode", "format", "cache"})


@dataclass(frozen=True)
class DiskSpec:
    """One disk: a file path or a network block URL QEMU opens itself."""

    path: str
    target: str = "xvda"
    writable: bool = True
    format: str | None = None  # None: not yet read from the image
    cache: str | None = None  # None: DEFAULT_CACHE

    @property
    def is_url(self) -> bool:
        return self.path.startswith(URL_SCHEMES)

    @property
    def guest_device(self) -> str:
        """The device name the guest kernel gives it (virtio: /dev/vdX)."""
        return "/dev/vd" + self.target[-1]

    @property
    def index(self) -> int:
        """Its place on the machine: vda is 0, vdb 1 (fixed by the target letter)."""
        return ord(self.target[-1]) - ord("a")

    @property
    def cache_mode(self) -> str:
        return self.cache or DEFAULT_CACHE

    def with_format(self, fmt: str) -> DiskSpec:
        return replace(self, format=fmt)

    def to_mapping(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "path": self.path,
            "target": self.target,
            "mode": "w" if self.writable else "r",
        }
        if self.format is not None:
            out["format"] = self.format
        if self.cache is not None:
            out["cache"] = self.cache
        return out


def parse_disks(value: Any, fail: Callable[[str, str], ConfigError]) -> tuple[DiskSpec, ...]:
    """The checked disk list; ``fail(key, why)`` makes the one-line error."""
    if not isinstance(value, list | tuple):
        raise fail("disk", f"expected a list, got {type(value).__name__}")
    disks: list[DiskSpec] = []
    for index, item in enumerate(value):
        disk = _parse_disk(item, index, fail)
        if any(d.target[-1] == disk.target[-1] for d in disks):
            raise fail(f"disk[{index}].target", f"{disk.target!r} is used twice")
        disks.append(disk)
    return tuple(disks)


def _parse_disk(item: Any, index: int, fail: Callable[[str, str], ConfigError]) -> DiskSpec:
    where = f"disk[{index}]"
    if not isinstance(item, Mapping):
        raise fail(where, "expected a table with path, target, mode")
    extra = sorted(set(item) - DISK_KEYS)
    if extra:
        raise fail(f"{where}.{extra[0]}", "unknown key")
    path = item.get("path")
    if not isinstance(path, str) or not path:
        raise fail(f"{where}.path", "a file path or nbd://, nfs://, iscsi:// URL is required")
    if not path.startswith("/") and not path.startswith(URL_SCHEMES):
        raise fail(f"{where}.path", f"{path!r} must be an absolute path or a nbd/nfs/iscsi URL")
    if "," in path or "\n" in path:
        raise fail(f"{where}.path", f"{path!r} must not contain ',' or newlines")
    target = item.get("target", "xvd" + "abcdefghijklmnopqrstuvwxyz"[index])
    if not isinstance(target, str) or not TARGET_RE.fullmatch(target):
        raise fail(f"{where}.target", f"{target!r} is not a disk name like xvda or vdb")
    mode = item.get("mode", "w")
    if mode not in ("w", "r", "rw", "ro"):
        raise fail(f"{where}.mode", f"{mode!r} is not 'w' or 'r'")
    fmt = item.get("format")
    if fmt is not None and fmt not in FORMATS:
        raise fail(f"{where}.format", f"{fmt!r} is not one of {', '.join(FORMATS)}")
    cache = item.get("cache")
    if cache is not None and cache not in CACHE_MODES:
        raise fail(f"{where}.cache", f"{cache!r} is not one of {', '.join(CACHE_MODES)}")
    return DiskSpec(path=path, target=target, writable=mode in ("w", "rw"), format=fmt, cache=cache)
