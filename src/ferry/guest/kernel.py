"""Fetch and unpack Debian's cloud kernel package with the host's apt."""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

from ferry.errors import ImageError
from ferry.guest.cache import file_sha256

KERNEL_METAPACKAGE = "linux-image-cloud-amd64"


@dataclass(frozen=True)
class KernelPackage:
    name: str  # e.g. linux-image-6.1.0-56-cloud-amd64
    version: str  # Debian package version, e.g. 6.1.192-2
    sha256: str  # of the .deb, as the apt index publishes it


@dataclass(frozen=True)
class KernelTree:
    root: Path  # where the .deb was unpacked
    release: str  # uname -r, e.g. 6.1.0-56-cloud-amd64
    vmlinuz: Path
    modules_dir: Path  # <root>/lib/modules/<release>, with modules.dep


def run(argv: list[str], what: str, cwd: Path | None = None) -> str:
    """Run a build tool; its failure becomes a one-line ImageError with stderr's last line."""
    try:
        proc = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, check=False)
    except OSError as err:
        raise ImageError(f"{what}: cannot run {argv[0]}: {err.strerror}") from err
    if proc.returncode != 0:
        lines = (proc.stderr or proc.stdout).strip().splitlines()
        detail = lines[-1] if lines else f"exit status {proc.returncode}"
        raise ImageError(f"{what}: {argv[0]} failed: {detail}")
    return proc.stdout


def resolve_kernel_package(metapackage: str = KERNEL_METAPACKAGE) -> KernelPackage:
    """The concrete image package (and candidate version) behind the metapackage."""
    what = f"resolving kernel package {metapackage}"
    deps = run(["apt-cache", "depends", "--no-recommends", "--no-suggests", metapackage], what)
    names = re.findall(r"^\s+Depends: (linux-image-\S+)$", deps, flags=re.MULTILINE)
    if not names:
        raise ImageError(f"{what}: apt-cache lists no linux-image dependency (run apt-get update?)")
    name = names[0]
    policy = run(["apt-cache", "policy", name], what)
    match = re.search(r"^\s+Candidate: (\S+)$", policy, flags=re.MULTILINE)
    if not match or match.group(1) == "(none)":
        raise ImageError(f"{what}: apt has no installable version of {name}")
    version = match.group(1)
    show = run(["apt-cache", "show", "--no-all-versions", f"{name}={version}"], what)
    sha = re.search(r"^SHA256: ([0-9a-f]{64})$", show, flags=re.MULTILINE)
    if not sha:
        raise ImageError(f"{what}: apt-cache show {name}={version} gives no SHA256")
    return KernelPackage(name, version, sha.group(1))


def fetch_kernel_deb(pkg: KernelPackage, downloads: Path) -> Path:
    """Download the .deb into ``downloads`` unless a verified copy is already there."""
    downloads.mkdir(parents=True, exist_ok=True)
    deb = downloads / f"{pkg.name}_{pkg.version.replace(':', '%3a')}_amd64.deb"
    if deb.exists() and file_sha256(deb) == pkg.sha256:
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
    if file_sha256(deb) != pkg.sha256:
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
