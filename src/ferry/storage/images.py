"""What a disk image is, read from the image itself with ``qemu-img``.

The format comes from the image's own header, never from its file name. At
create it is then pinned in the running domain's config, so that QEMU never
probes it again: a raw disk whose guest writes a qcow2 header into its first
sector must not turn into a qcow2 image at the next start or on a migration's
target. A qcow2 image's backing chain is followed layer by layer (qemu-img
info opens one layer only) and every layer must lie inside the storage roots
or on an allowed storage server: a backing file is read by QEMU with ferryd's
rights. A backing file without a recorded format is refused for the same
reason as probing.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ferry.domain.config import DomainConfig
from ferry.domain.disks import FORMATS, URL_SCHEMES, DiskSpec
from ferry.errors import StorageError
from ferry.storage.disks import check_url, resolve_disk

QEMU_IMG_TIMEOUT = 30.0
MAX_CHAIN = 16
# Block exports whose size is fixed when they are served: a qcow2 file grows.
FIXED_SIZE_SCHEMES = ("nbd://", "nbd+unix://", "iscsi://")
# qemu-img check's exit status when it found corruptions (2) or only leaks (3).
CHECK_CORRUPT = 2
CHECK_LEAKS = 3


@dataclass(frozen=True)
class ImageFacts:
    format: str
    virtual_size: int
    backing: tuple[str, ...] = ()  # the backing chain, top first, as paths or URLs


async def qemu_img(args: Sequence[str], what: str) -> tuple[int, str, str]:
    """Run qemu-img with a deadline; (exit status, stdout, stderr's last line)."""
    try:
        proc = await asyncio.create_subprocess_exec(
            "qemu-img", *args,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
    except OSError as exc:
        raise StorageError(f"{what}: cannot run qemu-img: {exc.strerror}") from None
    try:
        out, err = await asyncio.wait_for(proc.communicate(), QEMU_IMG_TIMEOUT)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise StorageError(f"{what}: no answer within {QEMU_IMG_TIMEOUT:.0f} s") from None
    lines = err.decode(errors="replace").strip().splitlines()
    last = lines[-1].removeprefix("qemu-img: ") if lines else ""
    return proc.returncode or 0, out.decode(errors="replace"), last


async def image_info(path: str, fmt: str | None, share: bool) -> dict[str, Any]:
    """One layer's ``qemu-img info``; ``share``: the image may be open in a QEMU."""
    args = ["info", "--output=json"]
    if share:
        args.append("-U")
    if fmt is not None:
        args += ["-f", fmt]
    rc, out, err = await qemu_img([*args, path], f"disk {path}")
    if rc != 0:
        raise StorageError(f"disk {path} cannot be read as {fmt or 'an image'}: {err}")
    try:
        info = json.loads(out)
        return info if isinstance(info, dict) else {}
    except json.JSONDecodeError:
        raise StorageError(f"disk {path}: qemu-img info gave no JSON") from None


async def inspect(
    disk: DiskSpec,
    roots: Sequence[Path],
    servers: Sequence[str],
    *,
    share: bool = False,
) -> ImageFacts:
    """The disk's format (checked against the config's, when it states one),
    size and backing chain, every layer checked to be where a disk may be."""
    top = disk.path if disk.is_url else resolve_disk(disk, roots)
    info = await image_info(top, None, share)
    fmt = str(info.get("format", ""))
    if fmt not in FORMATS:
        raise StorageError(
            f"disk {disk.path} is a {fmt or 'unknown'} image: ferry runs {' and '.join(FORMATS)} "
            "(convert with qemu-img convert -O qcow2)"
        )
    if disk.format is not None and fmt != disk.format:
        raise StorageError(
            f"disk {disk.path} is a {fmt} image, not {disk.format} as the config says"
        )
    if fmt == "qcow2" and disk.path.startswith(FIXED_SIZE_SCHEMES):
        # Seen in the lab: the guest gets I/O errors as soon as the image must grow.
        raise StorageError(
            f"disk {disk.path}: a qcow2 image cannot grow inside a fixed-size export; let "
            "the storage server open it as qcow2 (qemu-storage-daemon --blockdev "
            "driver=qcow2) and export its content raw"
        )
    size = int(info.get("virtual-size", -1))
    backing = await _backing_chain(disk.path, top, info, roots, servers, share)
    return ImageFacts(format=fmt, virtual_size=size, backing=backing)


async def _backing_chain(
    name: str,
    top: str,
    info: dict[str, Any],
    roots: Sequence[Path],
    servers: Sequence[str],
    share: bool,
) -> tuple[str, ...]:
    chain: list[str] = []
    layer, current = top, info
    while "backing-filename" in current:
        if len(chain) >= MAX_CHAIN:
            raise StorageError(f"disk {name}: more than {MAX_CHAIN} backing files")
        wanted = str(current.get("full-backing-filename") or current["backing-filename"])
        fmt = current.get("backing-filename-format")
        if fmt not in FORMATS:
            raise StorageError(
                f"disk {name}: backing file {wanted} of {layer} has "
                + (f"format {fmt}" if fmt else "no recorded format")
                + f" (record raw or qcow2: qemu-img rebase -u -F raw -b {wanted} {layer})"
            )
        backing = _backing_identity(name, layer, wanted, roots, servers)
        if backing in chain or backing == top:
            raise StorageError(f"disk {name}: its backing chain loops at {backing}")
        chain.append(backing)
        layer, current = backing, await image_info(backing, str(fmt), share=True)
    return tuple(chain)


def _backing_identity(
    name: str, layer: str, wanted: str, roots: Sequence[Path], servers: Sequence[str]
) -> str:
    """A backing file as a checked path or URL; refused outside the roots and servers."""
    if wanted.startswith("json:"):
        raise StorageError(f"disk {name}: backing file of {layer} is given as json: options")
    if wanted.startswith(URL_SCHEMES) or "://" in wanted:
        check_url(DiskSpec(path=wanted, writable=False), servers)
        return wanted
    path = wanted if os.path.isabs(wanted) else os.path.join(os.path.dirname(layer), wanted)
    try:
        return resolve_disk(DiskSpec(path=path, writable=False), roots)
    except StorageError as err:
        raise StorageError(f"disk {name}: backing file: {err}") from None


async def check_consistent(path: str, fmt: str) -> None:
    """Refuse a qcow2 image with corruptions (leaks alone are harmless)."""
    if fmt != "qcow2":
        return
    rc, out, err = await qemu_img(["check", "--output=json", "-f", fmt, path], f"disk {path}")
    if rc in (0, CHECK_LEAKS):
        return
    if rc == CHECK_CORRUPT:
        try:
            count = int(json.loads(out).get("corruptions", 0))
        except (json.JSONDecodeError, AttributeError, ValueError):
            count = 0
        raise StorageError(
            f"disk {path} is a corrupt qcow2 image ({count or 'some'} corruptions found by "
            f"qemu-img check; repair a copy with qemu-img check -r all)"
        )
    raise StorageError(f"disk {path} cannot be checked: {err or f'exit status {rc}'}")


async def pin_formats(
    cfg: DomainConfig,
    roots: Sequence[Path],
    servers: Sequence[str],
    in_use: Iterable[tuple[str, str]] = (),
) -> DomainConfig:
    """``cfg`` with every disk's format read from its image and checked.

    At create, when no QEMU has the disks open yet: qcow2 images are also
    checked for corruption here, since QEMU would find it only when the guest
    touches the broken cluster. ``in_use``: (domain, disk identity) of the
    disks other domains here write; none may be a backing file of ``cfg``'s.
    """
    writers = {identity: name for name, identity in in_use if name != cfg.name}
    disks = []
    for disk in cfg.disks:
        facts = await inspect(disk, roots, servers)
        for backing in facts.backing:
            if backing in writers:
                raise StorageError(
                    f"disk {disk.path}: its backing file {backing} is written by domain "
                    f"'{writers[backing]}'"
                )
        target = disk.path if disk.is_url else resolve_disk(disk, roots)
        await check_consistent(target, facts.format)
        disks.append(disk.with_format(facts.format))
    return cfg.with_disks(tuple(disks))


SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
MAX_DISK_BYTES = 64 << 40


def parse_size(text: str) -> int:
    """``10G``, ``512M``, ``1048576``: bytes, a whole number of 512-byte sectors."""
    body = text.strip().upper().removesuffix("B").removesuffix("I")
    unit = body[-1:] if body[-1:] in SIZE_UNITS else ""
    digits = body[: len(body) - len(unit)]
    if not digits.isdigit():
        raise StorageError(f"disk size {text!r} is not a size like 10G, 512M or 1048576")
    size = int(digits) * SIZE_UNITS[unit]
    if not 0 < size <= MAX_DISK_BYTES or size % 512:
        raise StorageError(f"disk size {text!r} must be a positive multiple of 512 bytes up to 64T")
    return size


async def create_disk(path: str, size: int, fmt: str, roots: Sequence[Path]) -> dict[str, Any]:
    """A new, empty disk image in a storage root; never over an existing file."""
    if fmt not in FORMATS:
        raise StorageError(f"disk format {fmt!r} is not one of {', '.join(FORMATS)}")
    if not os.path.isabs(path) or "," in path or "\n" in path:
        raise StorageError(f"disk {path!r} must be an absolute path without ',' or newlines")
    parent = Path(os.path.realpath(os.path.dirname(path)))
    if not any(parent == r or r in parent.parents for r in map(_real, roots)):
        where = ", ".join(str(r) for r in roots) or "none configured"
        raise StorageError(f"disk {path} would be outside this host's storage roots ({where})")
    target = parent / os.path.basename(path)
    try:
        # O_EXCL claims the name: qemu-img create alone would overwrite.
        os.close(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except FileExistsError:
        raise StorageError(f"disk {path} already exists: ferry never overwrites a disk") from None
    except OSError as exc:
        raise StorageError(f"disk {path} cannot be created: {exc.strerror}") from None
    rc, _, why = await qemu_img(["create", "-q", "-f", fmt, str(target), str(size)], path)
    if rc != 0:
        target.unlink(missing_ok=True)
        raise StorageError(f"disk {path} cannot be created: {why}")
    return {"path": str(target), "format": fmt, "size": size}


def _real(root: Path) -> Path:
    return Path(os.path.realpath(root))
