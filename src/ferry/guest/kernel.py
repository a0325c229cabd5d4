"""Fetch and unpack Debian's cloud kernel package with the host's apt."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from ferry.errors import ImageError
from ferry.guest.cache import file_sha256
from ferry.util.commands import run_tool as run

KERNEL_METAPACKAGE = "linux-image-cloud-amd64"


@dataclass(frozen=True)
class KernelPackage:
    name: str  # e.g. linux-image-6.1.0-56-cloud-amd64
    version: str  # Debian package version, e.g. 6.1.192-2


@dataclass(frozen=True)
class KernelTree:
    root: Path  # where the .deb was unpacked
    release: str  # uname -r, e.g. 6.1.0-56-cloud-amd64
    vmlinuz: Path
    modules_dir: Path  # <root>/lib/modules/<release>, with modules.dep


def resolve_kernel_package(metapackage: str = KERNEL_METAPACKAGE) -> KernelPackage:
    """The concrete image package (and candidate version) behind the metapackage."""
    what = f"resolving kernel package {metapackage}"
    # `apt-cache show --no-all-versions` describes the candidate version only; the
    # metapackage pins its image package with "(= version)", so one call suffices.
    meta = run(["apt-cache", "show", "--no-all-versions", metapackage], what)
    depends = re.search(r"^Depends: (.*)$", meta, flags=re.MULTILINE)
    pinned = re.search(
        r"(linux-image-[^\s,(|]+) \(= ([^)\s]+)\)", depends.group(1) if depends else ""
    )
    if pinned:
        return KernelPackage(pinned.group(1), pinned.group(2))
    names = re.findall(r"(linux-image-[^\s,(|]+)", depends.group(1)) if depends else []
    if not names:
        raise ImageError(f"{what}: apt-cache lists no linux-image dependency (run apt-get update?)")
    show = run(["apt-cache", "show", "--no-all-versions", names[0]], what)
    version = re.search(r"^Version: (\S+)$", show, flags=re.MULTILINE)
    if not version:
        raise ImageError(f"{what}: apt has no installable version of {names[0]}")
    return KernelPackage(names[0], version.group(1))


def published_sha256(pkg: KernelPackage) -> str:
    """The .deb's sha256 as the apt index publishes it."""
    what = f"looking up {pkg.name}={pkg.version} in the apt index"
    show = run(["apt-cache", "show", "--no-all-versions", f"{pkg.name}={pkg.version}"], what)
    sha = re.search(r"^SHA256: ([0-9a-f]{64})$", show, flags=re.MULTILINE)
    if not sha:
        raise ImageError(f"{what}: no SHA256 field")
    return sha.group(1)


def fetch_kernel_deb(pkg: KernelPackage, downloads: Path) -> Path:
    """Download the .deb into ``downloads`` unless a verified copy is already there."""
    downloads.mkdir(parents=True, exist_ok=True)
    deb = downloads / f"{pkg.name}_{pkg.version.replace(':', '%3a')}_amd64.deb"
    expected = published_sha256(pkg)
    if deb.exists() and file_sha256(deb) == expected:
        return deb
    deb.unlink(missing_ok=True)
    # Downloading as root into a root-owned dir: apt's _apt sandbox user could not write there.
    run(
        ["apt-get", "-q", "-o", "APT::Sandbox::User=root", "download", f"{pkg.name}={pkg.version}"],
        f"downloading {pkg.name}={pkg.version} into {downloads}",
        cwd=downloads,
    )
    if not deb.exists():
        raise ImageError(f"downloading {pkg.name}: apt-get left no {deb.name} in {downloads}")
    if file_sha256(deb) != expected:
        deb.unlink()
        raise ImageError(f"downloading {pkg.name}: {deb} does not match the apt index sha256")
    return deb


def unpack_kernel(deb: Path, dest: Path) -> KernelTree:
    """Unpack the .deb and generate modules.dep (the package ships none; depmod runs at install)."""
    run(["dpkg-deb", "-x", str(deb), str(dest)], f"unpacking {deb.name} into {dest}")
    images = sorted((dest / "boot").glob("vmlinuz-*"))
    if len(images) != 1:
        raise ImageError(f"unpacking {deb.name}: expected one boot/vmlinuz-*, found {len(images)}")
    release = images[0].name.removeprefix("vmlinuz-")
    modules_dir = dest / "lib" / "modules" / release
    if not modules_dir.is_dir():
        raise ImageError(f"unpacking {deb.name}: no lib/modules/{release} in the package")
    if not (modules_dir / "modules.dep").exists():
        run(["depmod", "-b", str(dest), release], f"running depmod for {release} in {dest}")
    return KernelTree(dest, release, images[0], modules_dir)
