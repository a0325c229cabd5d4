"""The on-disk guest image cache: input digests, manifests and their verification.

Layout of a cache directory::

    current -> images/<digest>      symlink, swapped atomically after a build
    images/<digest>/                one finished build: artifacts + manifest.json
    images/.tmp-*                   a build in progress (leftover = crashed build)
    base/<digest>/                  debootstrap'ed root trees, reused across builds
    downloads/                      fetched .deb files

A build directory only ever appears under its final name by ``rename``, and its
manifest is written last, so a directory without a valid manifest is never used.
This module does no building; it is pure enough to be unit tested.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from ferry.errors import ImageError

# Bump whenever the builder changes what it produces from the same inputs.
FORMAT_VERSION = 1

MANIFEST_NAME = "manifest.json"
CURRENT_LINK = "current"
IMAGES_DIR = "images"
TMP_PREFIX = ".tmp-"
KERNEL_NAME = "vmlinuz"
INITRD_NAME = "initrd.img"
ROOTFS_NAME = "rootfs.ext4"
ROLES = ("kernel", "initrd", "rootfs")

_CHUNK = 1 << 20


@dataclass(frozen=True)
class BuildInputs:
    """Everything a build depends on; equal inputs give an identical image."""

    kernel_package: str
    kernel_version: str
    suite: str
    packages: tuple[str, ...]
    guest_files: Mapping[str, str]  # file name -> sha256 of its content
    busybox_sha256: str
    format_version: int = FORMAT_VERSION

    def digest(self) -> str:
        canonical = {
            "kernel_package": self.kernel_package,
            "kernel_version": self.kernel_version,
            "suite": self.suite,
            "packages": sorted(self.packages),
            "guest_files": dict(sorted(self.guest_files.items())),
            "busybox_sha256": self.busybox_sha256,
            "format_version": self.format_version,
        }
        blob = json.dumps(canonical, sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()


@dataclass(frozen=True)
class Artifact:
    name: str
    size: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    digest: str
    kernel_version: str
    artifacts: Mapping[str, Artifact]  # role ("kernel", "initrd", "rootfs") -> artifact
    info: Mapping[str, str] = field(default_factory=dict)

    def to_json(self) -> str:
        data = {
            "format_version": FORMAT_VERSION,
            "digest": self.digest,
            "kernel_version": self.kernel_version,
            "artifacts": {
                role: {"name": a.name, "size": a.size, "sha256": a.sha256}
                for role, a in sorted(self.artifacts.items())
            },
            "info": dict(self.info),
        }
        return json.dumps(data, indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str, where: Path) -> Manifest:
        try:
            data = json.loads(text)
            if data["format_version"] != FORMAT_VERSION:
                raise ValueError(f"format version {data['format_version']} != {FORMAT_VERSION}")
            artifacts = {
                role: Artifact(str(a["name"]), int(a["size"]), str(a["sha256"]))
                for role, a in data["artifacts"].items()
            }
            missing = [role for role in ROLES if role not in artifacts]
            if missing:
                raise ValueError(f"no entry for {', '.join(missing)}")
            for a in artifacts.values():
                if "/" in a.name or a.name in ("", ".", ".."):
                    raise ValueError(f"bad artifact name {a.name!r}")
            info = {str(k): str(v) for k, v in data.get("info", {}).items()}
            return cls(str(data["digest"]), str(data["kernel_version"]), artifacts, info)
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise ImageError(f"guest image manifest {where} is corrupt: {err}") from err


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def describe_artifact(path: Path) -> Artifact:
    return Artifact(path.name, path.stat().st_size, file_sha256(path))


def write_manifest(directory: Path, manifest: Manifest) -> None:
    """Write the manifest durably; it is the last thing written into a build."""
    for artifact in manifest.artifacts.values():
        _fsync_path(directory / artifact.name)
    tmp = directory / (MANIFEST_NAME + ".part")
    with tmp.open("w") as f:
        f.write(manifest.to_json())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, directory / MANIFEST_NAME)
    _fsync_path(directory)


def read_manifest(directory: Path) -> Manifest:
    path = directory / MANIFEST_NAME
    try:
        text = path.read_text()
    except FileNotFoundError as err:
        raise ImageError(f"guest image in {directory} is incomplete: no {MANIFEST_NAME}") from err
    except (OSError, UnicodeDecodeError) as err:
        raise ImageError(f"cannot read guest image manifest {path}: {err}") from err
    return Manifest.from_json(text, path)


def verify_image_dir(directory: Path, *, deep: bool) -> Manifest:
    """Check a build directory against its manifest; raise ImageError on the first problem.

    The shallow check (presence and sizes) is what every user of the image pays;
    ``deep`` also compares sha256 of every artifact (about 1 s for the sparse rootfs).
    """
    manifest = read_manifest(directory)
    if directory.name != manifest.digest and not directory.name.startswith(TMP_PREFIX):
        raise ImageError(
            f"guest image {directory} is inconsistent: manifest digest is {manifest.digest[:12]}"
        )
    for role in ROLES:
        artifact = manifest.artifacts[role]
        path = directory / artifact.name
        try:
            size = path.stat().st_size
        except OSError as err:
            raise ImageError(f"guest image {role} {path} is missing: {err.strerror}") from err
        if size != artifact.size:
            raise ImageError(
                f"guest image {role} {path} has size {size}, manifest says {artifact.size}"
            )
        if deep and file_sha256(path) != artifact.sha256:
            raise ImageError(f"guest image {role} {path} does not match its sha256 in the manifest")
    return manifest


def current_dir(cache_dir: Path) -> Path | None:
    """The build the ``current`` link points to, or None if there is no link."""
    link = cache_dir / CURRENT_LINK
    if not link.is_symlink():
        return None
    return (cache_dir / os.readlink(link)).resolve()


def set_current(cache_dir: Path, build: Path) -> None:
    """Point ``current`` at ``build`` atomically (a rename over the old link)."""
    tmp = cache_dir / (CURRENT_LINK + ".part")
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(build.relative_to(cache_dir))
    os.replace(tmp, cache_dir / CURRENT_LINK)
    _fsync_path(cache_dir)


def leftover_temps(parent: Path) -> list[Path]:
    """Temp entries left by an interrupted build (only meaningful under the build lock)."""
    if not parent.is_dir():
        return []
    return sorted(p for p in parent.iterdir() if p.name.startswith(TMP_PREFIX))


def remove_tree(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)


def prune_images(cache_dir: Path, keep: Path, log: Callable[[str], None]) -> None:
    """Remove finished builds other than ``keep``; domains use their own disk copies."""
    images = cache_dir / IMAGES_DIR
    for entry in sorted(images.iterdir()):
        if entry == keep or entry.name.startswith(TMP_PREFIX):
            continue
        log(f"guest image: removing old image {entry.name[:12]}")
        remove_tree(entry)


@contextmanager
def build_lock(cache_dir: Path) -> Iterator[None]:
    """Serialise builders of one cache directory (a second builder waits)."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    with (cache_dir / ".lock").open("a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
