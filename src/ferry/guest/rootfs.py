"""The guest root disk: a debootstrap'ed Debian tree turned into a raw ext4 image."""

from __future__ import annotations

import hashlib
import os
import re
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from ferry.errors import ImageError
from ferry.guest.cache import TMP_PREFIX, remove_tree
from ferry.util import zipapp
from ferry.util.commands import run_tool as run

SUITE = "bookworm"
PACKAGES = ("python3", "iproute2", "iputils-ping", "procps", "qemu-guest-agent")
FALLBACK_MIRROR = "http://deb.debian.org/debian"
ROOTFS_SIZE = 1 << 30
BASE_FORMAT = 1

# Where each guest file lands in the root tree, with its mode.
GUEST_FILE_PLACES: Mapping[str, tuple[str, int]] = {
    "ferry-poweroff": ("usr/local/sbin/ferry-poweroff", 0o755),
    "ferry_ledger.py": ("etc/ferry/services.d/50-ledger", 0o755),
    "ferry_dirty.py": ("etc/ferry/services.d/60-dirty", 0o755),
    "ferry-media-server": ("usr/local/bin/ferry-media-server", 0o755),
    "media-service": ("etc/ferry/services.d/40-media", 0o755),
    "qemu-ga-service": ("etc/ferry/services.d/30-qemu-ga", 0o755),
    "ferry-shutdown": ("usr/sbin/shutdown", 0o755),
}

# PID 1 is a package (guest files named ferry_init/...), shipped as one zipapp so that the
# initramfs still execs a single file. -I: the kernel hands its unknown command-line
# words to init as environment, and no PYTHON* variable may steer PID 1.
INIT_PACKAGE = "ferry_init"
INIT_PATH = "sbin/ferry-init"
INIT_INTERPRETER = "/usr/bin/python3 -I"
# The zipapp's entry: run the package as `python3 -m ferry_init` would.
_INIT_BOOT = (
    f"import runpy\n\nrunpy.run_module({INIT_PACKAGE!r}, run_name='__main__', alter_sys=True)\n"
).encode()

# Space the image never needs: package caches and indexes, docs, translations.
_TRIM = ("var/cache/apt", "var/lib/apt/lists", "usr/share/doc", "usr/share/man", "usr/share/info")


def host_mirror(suite: str = SUITE, apt_dir: Path = Path("/etc/apt")) -> str:
    """The host's apt mirror for ``suite`` (deb822 .sources first, then sources.list)."""
    for sources in sorted((apt_dir / "sources.list.d").glob("*.sources")):
        for stanza in re.split(r"\n\s*\n", _read(sources)):
            fields = _deb822(stanza)
            if (
                "deb" in fields.get("types", "").split()
                and suite in fields.get("suites", "").split()
            ):
                uris = fields.get("uris", "").split()
                if uris:
                    return uris[0].rstrip("/")
    lists = [apt_dir / "sources.list", *sorted((apt_dir / "sources.list.d").glob("*.list"))]
    for path in lists:
        for line in _read(path).splitlines():
            words = [w for w in line.split("#", 1)[0].split() if not w.startswith("[")]
            if len(words) >= 3 and words[0] == "deb" and words[2] == suite:
                return words[1].rstrip("/")
    return FALLBACK_MIRROR


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def _deb822(stanza: str) -> dict[str, str]:
    fields: dict[str, str] = {}
    for line in stanza.splitlines():
        if line.startswith("#") or ":" not in line or line[:1].isspace():
            continue
        key, _, value = line.partition(":")
        fields[key.strip().lower()] = value.strip()
    return fields


def base_digest(suite: str, mirror: str, packages: tuple[str, ...]) -> str:
    key = f"{BASE_FORMAT}\n{suite}\n{mirror}\n{','.join(sorted(packages))}"
    return hashlib.sha256(key.encode()).hexdigest()


def ensure_base(
    base_dir: Path,
    suite: str,
    mirror: str,
    packages: tuple[str, ...],
    log: Callable[[str], None],
    *,
    refresh: bool = False,
) -> Path:
    """A debootstrap'ed tree for these inputs, built once and kept: debootstrap is the slow part."""
    final = base_dir / base_digest(suite, mirror, packages)
    if not refresh and (final / "root" / "usr" / "bin" / "python3").exists():
        return final / "root"
    if final.exists():
        log(f"guest image: removing base tree {final} ({'refresh' if refresh else 'incomplete'})")
        remove_tree(final)
    base_dir.mkdir(parents=True, exist_ok=True)
    for leftover in sorted(base_dir.glob(TMP_PREFIX + "*")):
        log(f"guest image: removing leftover base tree {leftover}")
        remove_tree(leftover)
    tmp = base_dir / f"{TMP_PREFIX}{final.name[:12]}-{os.getpid()}"
    log(f"guest image: debootstrap {suite} from {mirror} (+{', '.join(packages)}) ...")
    started = time.monotonic()
    run(
        [
            "debootstrap",
            "--variant=minbase",
            f"--include={','.join(packages)}",
            suite,
            str(tmp / "root"),
            mirror,
        ],
        f"debootstrap {suite} from {mirror} into {tmp}",
    )
    for rel in _TRIM:
        target = tmp / "root" / rel
        # Files only: apt and dpkg expect these directories to exist.
        for child in sorted(target.rglob("*"), reverse=True):
            if child.is_symlink() or child.is_file():
                child.unlink()
    os.rename(tmp, final)
    log(f"guest image: debootstrap done in {time.monotonic() - started:.0f} s")
    return final / "root"


def install_guest_files(root: Path, files: Mapping[str, bytes]) -> None:
    """Put ferry's guest side into a (copied) root tree."""
    for name, (rel, mode) in GUEST_FILE_PLACES.items():
        _write(root / rel, files[name], mode)
    _write(root / INIT_PATH, init_zipapp(files), 0o755)
    (root / "usr/local/sbin/poweroff").symlink_to("ferry-poweroff")
    for rel in ("etc/ferry/services.d", "var/log/ferry"):
        (root / rel).mkdir(parents=True, exist_ok=True)
    _write(root / "etc/hostname", b"ferry-guest\n", 0o644)
    # The disk is shared by the hosts of a migration, never by two running guests.
    _write(root / "etc/fstab", b"/dev/vda / ext4 rw,errors=remount-ro 0 1\n", 0o644)


def init_zipapp(files: Mapping[str, bytes]) -> bytes:
    """/sbin/ferry-init: the ferry_init/... guest files and a __main__ that runs them."""
    prefix = f"{INIT_PACKAGE}/"
    entries = {name: data for name, data in files.items() if name.startswith(prefix)}
    if f"{prefix}__main__.py" not in entries:
        raise ImageError(f"guest files hold no {prefix}__main__.py: {sorted(files)}")
    return zipapp.build({**entries, "__main__.py": _INIT_BOOT}, INIT_INTERPRETER)


def _write(path: Path, data: bytes, mode: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # Replace rather than rewrite in place: the staging tree may share inodes with the base.
    tmp = path.with_name(path.name + ".ferry-new")
    tmp.write_bytes(data)
    tmp.chmod(mode)
    os.replace(tmp, path)


def stage_tree(base: Path, dest: Path) -> None:
    """Copy the base tree for one image build, keeping owners, modes, links and devices."""
    run(["cp", "-a", "--reflink=auto", str(base), str(dest)], f"copying {base} to {dest}")


def make_ext4(root: Path, out: Path, size: int = ROOTFS_SIZE) -> None:
    """Turn a directory into a sparse raw ext4 image without mounting anything."""
    with out.open("wb") as f:
        f.truncate(size)
    run(
        [
            "mke2fs", "-q", "-F", "-t", "ext4", "-L", "ferry-root",
            "-E", "root_owner=0:0", "-d", str(root), str(out),
        ],
        f"creating ext4 image {out} from {root}",
    )  # fmt: skip
    run(["e2fsck", "-fn", str(out)], f"checking ext4 image {out}")
