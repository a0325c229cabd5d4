"""The guest image: kernel, initramfs and root disk built from Debian packages, cached.

``build_image`` returns the cached build when its inputs are unchanged and the
cache verifies, and rebuilds otherwise; ``load_image`` only reads the cache.
The cache layout and its checks live in :mod:`ferry.guest.cache`.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from ferry.errors import ImageError
from ferry.guest import cache, initramfs, kernel, rootfs
from ferry.storage.new_disk import write_new_disk
from ferry.stream import bundle, media

# Package data under ferry/guest/files; ferry_init/... becomes the zipapp /sbin/ferry-init.
GUEST_FILES = (
    "init",
    "ferry_init/__init__.py",
    "ferry_init/__main__.py",
    "ferry_init/console.py",
    "ferry_init/network.py",
    "ferry_init/nocloud.py",
    "ferry_init/power_button.py",
    "ferry_init/services.py",
    "ferry_init/supervisor.py",
    "ferry_init/system.py",
    "ferry-poweroff",
    "ferry_ledger.py",
    "ferry_dirty.py",
    "media-service",
    "qemu-ga-service",
    "ferry-shutdown",
)
MOVIE_SECONDS = 90
# A short clip beside the movie: tests play it to the end, checksum and all.
CLIP_SECONDS = 30


@dataclass(frozen=True)
class GuestImage:
    kernel: Path  # vmlinuz
    initrd: Path  # initramfs (cpio.gz)
    rootfs: Path  # raw ext4 image, whole disk, no partition table (guest sees /dev/vda)
    kernel_version: str  # e.g. "6.1.0-56-cloud-amd64"
    digest: str  # hash of the build inputs; identifies this build


def default_cache_dir() -> Path:
    return Path(os.environ.get("FERRY_CACHE_DIR") or "/var/cache/ferry/guest")


def guest_files() -> dict[str, bytes]:
    """ferry's guest-side scripts, shipped as package data."""
    base = resources.files("ferry.guest").joinpath("files")
    try:
        files = {name: base.joinpath(name).read_bytes() for name in GUEST_FILES}
        # The media server is a package; the guest gets it as one file, a zipapp.
        files["ferry-media-server"] = bundle.media_server_zipapp()
    except OSError as err:
        raise ImageError(f"reading ferry's guest files from {base}: {err}") from err
    # Not a file: the test movie's recipe, so that a new recipe rebuilds the image.
    files["media-recipe"] = f"{media.MEDIA_VERSION}:{MOVIE_SECONDS}:{CLIP_SECONDS}".encode()
    return files


def collect_inputs(files: dict[str, bytes]) -> cache.BuildInputs:
    pkg = kernel.resolve_kernel_package()
    try:
        busybox = cache.file_sha256(initramfs.BUSYBOX)
    except OSError as err:
        raise ImageError(
            f"reading {initramfs.BUSYBOX}: {err.strerror} (install busybox-static)"
        ) from err
    # The zipapp as well as its sources: a new interpreter line or entry point rebuilds too.
    hashed = {**files, rootfs.INIT_PATH: rootfs.init_zipapp(files)}
    return cache.BuildInputs(
        kernel_package=pkg.name,
        kernel_version=pkg.version,
        suite=rootfs.SUITE,
        packages=rootfs.PACKAGES,
        guest_files={name: hashlib.sha256(data).hexdigest() for name, data in hashed.items()},
        busybox_sha256=busybox,
    )


def _image_from(directory: Path, manifest: cache.Manifest) -> GuestImage:
    art = manifest.artifacts
    return GuestImage(
        kernel=directory / art["kernel"].name,
        initrd=directory / art["initrd"].name,
        rootfs=directory / art["rootfs"].name,
        kernel_version=manifest.kernel_version,
        digest=manifest.digest,
    )


def load_image(cache_dir: Path | None = None) -> GuestImage:
    """The current cached image, after a cheap check (presence and sizes)."""
    cache_dir = cache_dir or default_cache_dir()
    current = cache.current_dir(cache_dir)
    if current is None:
        raise ImageError(f"no guest image in {cache_dir}: run `ferry image build`")
    try:
        manifest = cache.verify_image_dir(current, deep=False)
    except ImageError as err:
        raise ImageError(f"{err}: run `ferry image build`") from err
    return _image_from(current, manifest)


def build_image(
    cache_dir: Path | None = None, *, force: bool = False, log: Callable[[str], None] = print
) -> GuestImage:
    """The image for the current inputs: reused from the cache if it verifies, else built.

    ``force`` rebuilds everything, including the debootstrap'ed base tree that
    ordinary rebuilds reuse (it depends only on suite, mirror and package list).
    """
    cache_dir = cache_dir or default_cache_dir()
    files = guest_files()
    inputs = collect_inputs(files)
    digest = inputs.digest()
    with cache.build_lock(cache_dir):
        images = cache_dir / cache.IMAGES_DIR
        images.mkdir(parents=True, exist_ok=True)
        for leftover in cache.leftover_temps(images):
            log(f"guest image: removing leftover of an interrupted build: {leftover}")
            cache.remove_tree(leftover)
        final = images / digest
        if final.exists() and not force:
            try:
                manifest = cache.verify_image_dir(final, deep=True)
            except ImageError as err:
                log(f"guest image: cached image is broken, rebuilding: {err}")
            else:
                cache.set_current(cache_dir, final)
                log(f"guest image: cached (digest {digest[:12]}, kernel {manifest.kernel_version})")
                return _image_from(final, manifest)
        if os.geteuid() != 0:
            raise ImageError(f"building the guest image in {cache_dir} needs root (debootstrap)")
        started = time.monotonic()
        log(f"guest image: building {digest[:12]} in {cache_dir}")
        tmp = images / f"{cache.TMP_PREFIX}{digest[:12]}-{os.getpid()}"
        try:
            manifest = _build(cache_dir, tmp, inputs, files, log, refresh_base=force)
            if final.exists():
                cache.remove_tree(final)
            os.rename(tmp, final)
        finally:
            if tmp.exists():
                cache.remove_tree(tmp)
        cache.set_current(cache_dir, final)
        cache.prune_images(cache_dir, final, log)
        log(f"guest image: built {digest[:12]} in {time.monotonic() - started:.0f} s")
        return _image_from(final, manifest)


def _build(
    cache_dir: Path,
    out: Path,
    inputs: cache.BuildInputs,
    files: dict[str, bytes],
    log: Callable[[str], None],
    *,
    refresh_base: bool = False,
) -> cache.Manifest:
    work = out / "work"
    work.mkdir(parents=True)
    pkg = kernel.resolve_kernel_package()
    if (pkg.name, pkg.version) != (inputs.kernel_package, inputs.kernel_version):
        raise ImageError(f"kernel package changed during the build: now {pkg.name}={pkg.version}")
    log(f"guest image: kernel {pkg.name} {pkg.version}")
    deb = kernel.fetch_kernel_deb(pkg, cache_dir / "downloads")
    tree = kernel.unpack_kernel(deb, work / "kernel")
    shutil.copyfile(tree.vmlinuz, out / cache.KERNEL_NAME)

    modules = initramfs.build_initramfs(tree, files["init"], out / cache.INITRD_NAME)
    log(f"guest image: initramfs with busybox and modules {' '.join(modules)}")

    mirror = rootfs.host_mirror(inputs.suite)
    base = rootfs.ensure_base(
        cache_dir / "base", inputs.suite, mirror, inputs.packages, log, refresh=refresh_base
    )
    staged = work / "root"
    rootfs.stage_tree(base, staged)
    rootfs.install_guest_files(staged, files)
    media.generate_movie(staged / "home" / "mp3", "movie", MOVIE_SECONDS, log=log)
    media.generate_movie(staged / "home" / "mp3", "clip", CLIP_SECONDS, log=log)
    log(f"guest image: mke2fs ext4 root disk ({rootfs.ROOTFS_SIZE >> 20} MiB sparse)")
    rootfs.make_ext4(staged, out / cache.ROOTFS_NAME)
    cache.remove_tree(work)

    artifacts = {
        "kernel": cache.describe_artifact(out / cache.KERNEL_NAME),
        "initrd": cache.describe_artifact(out / cache.INITRD_NAME),
        "rootfs": cache.describe_artifact(out / cache.ROOTFS_NAME),
    }
    info = {"kernel_package": f"{pkg.name}={pkg.version}", "mirror": mirror, "suite": inputs.suite}
    manifest = cache.Manifest(inputs.digest(), tree.release, artifacts, info)
    cache.write_manifest(out, manifest)
    return manifest


def make_domain_disk(image: GuestImage, dest: Path) -> None:
    """Copy the root disk to ``dest`` keeping it sparse; never overwrite an existing file."""
    write_new_disk(dest, lambda tmp: _sparse_copy(image.rootfs, tmp))


def _sparse_copy(src: Path, dest: Path) -> None:
    """Copy only the data extents (SEEK_DATA/SEEK_HOLE), so holes stay holes."""
    with dest.open("xb") as fout:
        sparse_copy_into(src, fout.fileno(), 0)
        fout.truncate(src.stat().st_size)
        fout.flush()
        os.fsync(fout.fileno())


def sparse_copy_into(src: Path, fd_out: int, at: int) -> None:
    """Copy ``src``'s data extents into ``fd_out`` from byte ``at`` on; holes stay holes."""
    with src.open("rb") as fin:
        size = os.fstat(fin.fileno()).st_size
        offset = 0
        while offset < size:
            try:
                start = os.lseek(fin.fileno(), offset, os.SEEK_DATA)
            except OSError as err:
                if err.errno == errno.ENXIO:  # only a hole is left
                    break
                raise
            end = os.lseek(fin.fileno(), start, os.SEEK_HOLE)
            _copy_range(fin.fileno(), fd_out, start, end, at)
            offset = end


def _copy_range(fd_in: int, fd_out: int, start: int, end: int, at: int) -> None:
    pos = start
    while pos < end:
        try:
            n = os.copy_file_range(fd_in, fd_out, end - pos, pos, pos + at)
        except OSError as err:
            if err.errno not in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
                raise
            n = os.pwrite(fd_out, os.pread(fd_in, min(end - pos, 1 << 20), pos), pos + at)
        if n == 0:
            raise OSError(errno.EIO, f"short copy at offset {pos}")
        pos += n
