"""The device strings of an xm file: ``disk = ['tap:aio:/xen/vm.img,xvda,w']`` and
``vif = ['mac=...,bridge=...']``, each as ferry's canonical table plus notes on
what could not be honoured (see :mod:`ferry.config.xm` for the file itself).
"""

from __future__ import annotations

import re
from typing import Any

from ferry.domain.disks import URL_SCHEMES
from ferry.errors import ConfigError

VIF_IGNORED: dict[str, str] = {
    "ip": "xm gave it to the host's vif scripts, not to the guest; set the top-level 'ip'",
    "script": "ferry attaches the tap to the bridge itself",
    "type": "ferry always gives a virtio NIC",
    "model": "ferry always gives a virtio NIC",
    "vifname": "ferry names its tap devices itself",
    "rate": "no traffic shaping",
    "backend": "no driver domains",
    "uuid": "not used",
    "accel": "not used",
}

# Types whose data xm handed to blktap/file backends as raw bytes.
_RAW_PREFIXES = frozenset(
    {
        "file:", "tap:aio:", "tap:sync:", "tap:tapdisk:aio:", "tap:tapdisk:sync:",
        "tap2:aio:", "tap2:tapdisk:aio:",
    }
)  # fmt: skip
_FORMATS = ("qcow", "vhd", "ram", "vmdk")
_TYPE_PREFIX = re.compile(r"^((?:[A-Za-z0-9_]+:)+)(.*)$")
_PARTITION = re.compile(r"^(xvd|sd|hd|vd)[a-z]\d+$")


def parse_disk_entry(entry: Any, at: str) -> tuple[dict[str, str] | None, list[str]]:
    """One xm disk string as ``{path, target, mode}``; None for a skipped CD-ROM."""
    if not isinstance(entry, str):
        raise ConfigError(f"{at}: disk {entry!r}: expected a string 'type:path,target,mode'")
    fields = [part.strip() for part in entry.split(",")]
    if len(fields) == 4:
        raise ConfigError(f"{at}: disk {entry!r}: a backend (driver) domain is not supported")
    if len(fields) != 3:
        raise ConfigError(f"{at}: disk {entry!r}: expected 'type:path,target,mode'")
    uname, target, mode = fields
    target = target.removeprefix("ioemu:")
    target, _, kind = target.partition(":")
    if kind == "cdrom":
        return None, [f"disk {entry!r} ignored: CD-ROM drives are not supported"]
    if kind not in ("", "disk"):
        raise ConfigError(f"{at}: disk {entry!r}: device kind {kind!r} is not supported")
    if _PARTITION.match(target):
        raise ConfigError(
            f"{at}: disk {entry!r}: partition target {target!r} cannot be honoured: "
            "ferry attaches whole disks; use a whole-disk image"
        )
    notes: list[str] = []
    if mode == "w!":
        mode = "w"
        notes.append(
            f"disk {target} mode 'w!' taken as 'w': ferry never lets two domains write one disk"
        )
    path, fmt = _disk_path(uname, entry, at)
    disk = {"path": path, "target": target, "mode": mode}
    if fmt is not None:
        disk["format"] = fmt
    return disk, notes


def _disk_path(uname: str, entry: str, at: str) -> tuple[str, str | None]:
    """The disk's path and the format the entry states (None: read from the image)."""
    if uname.startswith(URL_SCHEMES):
        return uname, None
    match = _TYPE_PREFIX.match(uname)
    if match is None:
        return uname, None  # no type: a path, taken as given
    prefix, rest = match.groups()
    if prefix in _RAW_PREFIXES:
        return rest, None
    if prefix == "phy:":
        return (rest if rest.startswith("/") else "/dev/" + rest), None
    fmt = prefix.rstrip(":").rsplit(":", 1)[-1]
    if prefix.startswith(("tap:", "tap2:")) and fmt == "qcow2":
        return rest, "qcow2"
    if prefix.startswith(("tap:", "tap2:")) and fmt in _FORMATS:
        raise ConfigError(
            f"{at}: disk {entry!r}: image format {fmt!r} is not supported: ferry runs raw and "
            "qcow2 images (convert with qemu-img convert -O qcow2)"
        )
    raise ConfigError(
        f"{at}: disk {entry!r}: disk type {prefix!r} is not supported: give file:, tap:aio:, "
        "phy: or an nbd://, nfs://, iscsi:// URL"
    )


def parse_vif_entry(entry: Any, index: int, at: str) -> tuple[dict[str, str], list[str]]:
    """One xm vif string (``'mac=..., bridge=...'``, '' for defaults) as ``{mac, bridge}``."""
    if not isinstance(entry, str):
        raise ConfigError(f"{at}: vif {entry!r}: expected a string 'mac=...,bridge=...'")
    out: dict[str, str] = {}
    notes: list[str] = []
    seen: set[str] = set()
    for part in entry.split(","):
        if not part.strip():
            continue
        key, sep, value = (s.strip() for s in part.partition("="))
        if not sep or not key:
            raise ConfigError(f"{at}: vif {entry!r}: {part.strip()!r} is not key=value")
        if key in seen:
            raise ConfigError(f"{at}: vif {entry!r}: '{key}' given twice")
        seen.add(key)
        if key in ("mac", "bridge"):
            out[key] = value
        elif key in VIF_IGNORED:
            notes.append(f"vif[{index}] {key}={value} ignored: {VIF_IGNORED[key]}")
        else:
            raise ConfigError(f"{at}: vif {entry!r}: unknown vif key '{key}'")
    return out, notes
