"""Guest image cache logic, without debootstrap, apt or QEMU."""

from __future__ import annotations

import dataclasses
import gzip
import json
import os
from pathlib import Path

import pytest

from ferry.errors import ImageError, StorageError
from ferry.guest import cache, image, initramfs, kernel, rootfs
from ferry.guest.cache import BuildInputs, Manifest

INPUTS = BuildInputs(
    kernel_package="linux-image-6.1.0-56-cloud-amd64",
    kernel_version="6.1.192-2",
    suite="bookworm",
    packages=("python3", "iproute2"),
    guest_files={"init": "a" * 64, "ferry-init": "b" * 64},
    busybox_sha256="c" * 64,
)


def make_build(directory: Path, digest: str, rootfs_size: int = 1 << 20) -> Manifest:
    """A finished build with small fake artifacts and a valid manifest."""
    directory.mkdir(parents=True)
    (directory / cache.KERNEL_NAME).write_bytes(b"kernel" * 100)
    (directory / cache.INITRD_NAME).write_bytes(gzip.compress(b"initrd"))
    with (directory / cache.ROOTFS_NAME).open("wb") as f:
        f.write(b"ext4 superblock")
        f.truncate(rootfs_size)
    artifacts = {
        "kernel": cache.describe_artifact(directory / cache.KERNEL_NAME),
        "initrd": cache.describe_artifact(directory / cache.INITRD_NAME),
        "rootfs": cache.describe_artifact(directory / cache.ROOTFS_NAME),
    }
    manifest = Manifest(digest, "6.1.0-56-cloud-amd64", artifacts)
    cache.write_manifest(directory, manifest)
    return manifest


# --- digests -----------------------------------------------------------------


def test_digest_is_stable_and_ignores_package_order() -> None:
    assert INPUTS.digest() == dataclasses.replace(INPUTS).digest()
    reordered = dataclasses.replace(INPUTS, packages=("iproute2", "python3"))
    assert reordered.digest() == INPUTS.digest()


@pytest.mark.parametrize(
    "change",
    [
        {"kernel_package": "linux-image-6.1.0-57-cloud-amd64"},
        {"kernel_version": "6.1.193-1"},
        {"suite": "trixie"},
        {"packages": ("python3", "iproute2", "procps")},
        {"guest_files": {"init": "a" * 64, "ferry-init": "d" * 64}},
        {"busybox_sha256": "e" * 64},
        {"format_version": cache.FORMAT_VERSION + 1},
    ],
)
def test_digest_changes_with_every_input(change: dict[str, object]) -> None:
    assert dataclasses.replace(INPUTS, **change).digest() != INPUTS.digest()  # type: ignore[arg-type]


def test_guest_file_content_reaches_the_digest(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(
        kernel,
        "resolve_kernel_package",
        lambda: kernel.KernelPackage("linux-image-x", "1"),
    )
    files = image.guest_files()
    assert set(files) == {*image.GUEST_FILES, "ferry-media-server", "media-recipe"}
    for name in ("ferry_init/network.py", "ferry_ledger.py", "ferry-media-server", "media-recipe"):
        changed = dict(files, **{name: files[name] + b"\n# changed\n"})
        assert image.collect_inputs(files).digest() != image.collect_inputs(changed).digest()
    # /sbin/ferry-init is built from its sources: how it is built counts too.
    before = image.collect_inputs(files).digest()
    monkeypatch.setattr(rootfs, "INIT_INTERPRETER", "/usr/bin/python3.11 -I")
    assert image.collect_inputs(files).digest() != before


# --- manifest verification ---------------------------------------------------


def test_valid_build_verifies_shallow_and_deep(tmp_path: Path) -> None:
    build = tmp_path / "d1"
    written = make_build(build, "d1")
    assert cache.verify_image_dir(build, deep=False) == written
    assert cache.verify_image_dir(build, deep=True) == written


def test_missing_manifest_is_detected(tmp_path: Path) -> None:
    build = tmp_path / "d1"
    make_build(build, "d1")
    (build / cache.MANIFEST_NAME).unlink()
    with pytest.raises(ImageError, match=r"incomplete: no manifest.json"):
        cache.verify_image_dir(build, deep=False)


@pytest.mark.parametrize(
    "text",
    [
        "{not json",
        "[]",
        json.dumps({"format_version": cache.FORMAT_VERSION}),
        json.dumps({"format_version": 999, "digest": "d1", "kernel_version": "k", "artifacts": {}}),
        json.dumps(
            {
                "format_version": cache.FORMAT_VERSION,
                "digest": "d1",
                "kernel_version": "k",
                "artifacts": {"kernel": {"name": "vmlinuz", "size": 1, "sha256": "x"}},
            }
        ),
    ],
)
def test_corrupt_manifest_is_detected(tmp_path: Path, text: str) -> None:
    build = tmp_path / "d1"
    make_build(build, "d1")
    (build / cache.MANIFEST_NAME).write_text(text)
    with pytest.raises(ImageError, match="corrupt"):
        cache.verify_image_dir(build, deep=False)


def test_manifest_cannot_point_outside_its_directory(tmp_path: Path) -> None:
    build = tmp_path / "d1"
    make_build(build, "d1")
    data = json.loads((build / cache.MANIFEST_NAME).read_text())
    data["artifacts"]["kernel"]["name"] = "../../etc/passwd"
    (build / cache.MANIFEST_NAME).write_text(json.dumps(data))
    with pytest.raises(ImageError, match="bad artifact name"):
        cache.verify_image_dir(build, deep=False)


def test_missing_artifact_is_detected(tmp_path: Path) -> None:
    build = tmp_path / "d1"
    make_build(build, "d1")
    (build / cache.INITRD_NAME).unlink()
    with pytest.raises(ImageError, match=r"initrd .* is missing"):
        cache.verify_image_dir(build, deep=False)


def test_truncated_artifact_is_detected(tmp_path: Path) -> None:
    build = tmp_path / "d1"
    make_build(build, "d1")
    os.truncate(build / cache.ROOTFS_NAME, 4096)
    with pytest.raises(ImageError, match=r"rootfs .* has size 4096"):
        cache.verify_image_dir(build, deep=False)


def test_same_size_corruption_needs_the_deep_check(tmp_path: Path) -> None:
    build = tmp_path / "d1"
    make_build(build, "d1")
    with (build / cache.KERNEL_NAME).open("r+b") as f:
        f.write(b"XXXX")
    cache.verify_image_dir(build, deep=False)
    with pytest.raises(ImageError, match=r"kernel .* sha256"):
        cache.verify_image_dir(build, deep=True)


def test_build_under_another_digest_name_is_rejected(tmp_path: Path) -> None:
    build = tmp_path / "d2"
    make_build(build, "d1")
    with pytest.raises(ImageError, match="inconsistent"):
        cache.verify_image_dir(build, deep=False)


def test_leftover_temps_are_found(tmp_path: Path) -> None:
    (tmp_path / "d1").mkdir()
    (tmp_path / ".tmp-d2-123").mkdir()
    assert cache.leftover_temps(tmp_path) == [tmp_path / ".tmp-d2-123"]
    assert cache.leftover_temps(tmp_path / "absent") == []


def test_current_link_is_swapped(tmp_path: Path) -> None:
    assert cache.current_dir(tmp_path) is None
    for name in ("d1", "d2"):
        build = tmp_path / cache.IMAGES_DIR / name
        build.mkdir(parents=True)
        cache.set_current(tmp_path, build)
        assert cache.current_dir(tmp_path) == build
        assert not os.readlink(tmp_path / cache.CURRENT_LINK).startswith("/")


# --- build_image / load_image over a fake cache ---------------------------------


class FakeBuilder:
    """Stands in for the real (debootstrap) build and counts its calls."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(
        self,
        cache_dir: Path,
        out: Path,
        inputs: BuildInputs,
        files: object,
        log: object,
        *,
        refresh_base: bool = False,
    ) -> Manifest:
        self.calls += 1
        return make_build(out, inputs.digest())


@pytest.fixture
def fake_build(monkeypatch: pytest.MonkeyPatch) -> FakeBuilder:
    builder = FakeBuilder()
    monkeypatch.setattr(image, "collect_inputs", lambda files: INPUTS)
    monkeypatch.setattr(image, "_build", builder)
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    return builder


def test_load_image_without_cache_says_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match=r"no guest image in .*: run `ferry image build`"):
        image.load_image(tmp_path)


def test_build_then_cached_then_load(tmp_path: Path, fake_build: FakeBuilder) -> None:
    logs: list[str] = []
    built = image.build_image(tmp_path, log=logs.append)
    assert fake_build.calls == 1
    assert built.digest == INPUTS.digest()
    assert built.rootfs == tmp_path / "images" / INPUTS.digest() / cache.ROOTFS_NAME
    again = image.build_image(tmp_path, log=logs.append)
    assert fake_build.calls == 1
    assert again == built
    assert logs[-1].startswith(f"guest image: cached (digest {INPUTS.digest()[:12]}")
    assert image.load_image(tmp_path) == built
    image.build_image(tmp_path, force=True, log=logs.append)
    assert fake_build.calls == 2


@pytest.mark.parametrize(
    "damage",
    [
        lambda d: (d / cache.MANIFEST_NAME).unlink(),
        lambda d: (d / cache.MANIFEST_NAME).write_text("{"),
        lambda d: (d / cache.INITRD_NAME).unlink(),
        lambda d: os.truncate(d / cache.ROOTFS_NAME, 10),
        lambda d: (d / cache.KERNEL_NAME).write_bytes(b"k" * 600),
    ],
    ids=["no-manifest", "corrupt-manifest", "missing-initrd", "short-rootfs", "kernel-content"],
)
def test_broken_cache_is_reported_and_rebuilt(
    tmp_path: Path, fake_build: FakeBuilder, damage: object
) -> None:
    image.build_image(tmp_path, log=lambda line: None)
    assert callable(damage)
    damage(tmp_path / "images" / INPUTS.digest())
    logs: list[str] = []
    rebuilt = image.build_image(tmp_path, log=logs.append)
    assert fake_build.calls == 2
    assert any("cached image is broken" in line for line in logs), logs
    cache.verify_image_dir(rebuilt.rootfs.parent, deep=True)


def test_load_image_refuses_a_broken_current(tmp_path: Path, fake_build: FakeBuilder) -> None:
    built = image.build_image(tmp_path, log=lambda line: None)
    built.initrd.unlink()
    with pytest.raises(ImageError, match=r"initrd .* is missing.*ferry image build"):
        image.load_image(tmp_path)


def test_leftover_temp_dir_is_reported_and_removed(tmp_path: Path, fake_build: FakeBuilder) -> None:
    leftover = tmp_path / "images" / ".tmp-deadbeef-1"
    leftover.mkdir(parents=True)
    logs: list[str] = []
    image.build_image(tmp_path, log=logs.append)
    assert not leftover.exists()
    assert any("interrupted build" in line for line in logs), logs


def test_new_inputs_replace_the_old_image(
    tmp_path: Path, fake_build: FakeBuilder, monkeypatch: pytest.MonkeyPatch
) -> None:
    old = image.build_image(tmp_path, log=lambda line: None)
    newer = dataclasses.replace(INPUTS, kernel_version="6.1.193-1")
    monkeypatch.setattr(image, "collect_inputs", lambda files: newer)
    new = image.build_image(tmp_path, log=lambda line: None)
    assert new.digest == newer.digest() != old.digest
    assert image.load_image(tmp_path) == new
    assert not old.rootfs.parent.exists()


def test_default_cache_dir_honours_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("FERRY_CACHE_DIR", str(tmp_path))
    assert image.default_cache_dir() == tmp_path
    monkeypatch.delenv("FERRY_CACHE_DIR")
    assert image.default_cache_dir() == Path("/var/cache/ferry/guest")


# --- domain disks ------------------------------------------------------------


def test_make_domain_disk_copies_sparsely_and_never_overwrites(
    tmp_path: Path, fake_build: FakeBuilder
) -> None:
    built = image.build_image(tmp_path / "cache", log=lambda line: None)
    with built.rootfs.open("r+b") as f:
        f.seek((1 << 20) - 5)
        f.write(b"tail!")
    dest = tmp_path / "dom" / "disk.img"
    with pytest.raises(StorageError, match="does not exist"):
        image.make_domain_disk(built, dest)
    dest.parent.mkdir()
    image.make_domain_disk(built, dest)
    assert dest.read_bytes() == built.rootfs.read_bytes()
    assert dest.stat().st_blocks * 512 < dest.stat().st_size
    dest.write_bytes(b"guest data")
    with pytest.raises(StorageError, match="refusing to overwrite"):
        image.make_domain_disk(built, dest)
    assert dest.read_bytes() == b"guest data"
    assert sorted(p.name for p in dest.parent.iterdir()) == ["disk.img"]


# --- initramfs and rootfs helpers --------------------------------------------

MODULES_DEP = """\
kernel/drivers/virtio/virtio.ko:
kernel/drivers/virtio/virtio_ring.ko:
kernel/drivers/virtio/virtio_pci.ko: kernel/drivers/virtio/virtio_pci_modern_dev.ko \
kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/virtio/virtio_pci_modern_dev.ko:
kernel/drivers/net/virtio_net.ko.xz: kernel/drivers/net/net_failover.ko.xz \
kernel/net/core/failover.ko kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/net/net_failover.ko.xz: kernel/net/core/failover.ko
kernel/net/core/failover.ko:
"""


def test_module_load_order_puts_dependencies_first() -> None:
    deps = initramfs.parse_modules_dep(MODULES_DEP)
    builtin = initramfs.parse_builtin("kernel/fs/ext4/ext4.ko\n")
    order = initramfs.load_order(("virtio_pci", "virtio-net", "ext4"), deps, builtin)
    names = [m.name for m in order]
    assert names == [
        "virtio_ring",
        "virtio",
        "virtio_pci_modern_dev",
        "virtio_pci",
        "failover",
        "net_failover",
        "virtio_net",
    ]
    assert order[-1].path == "kernel/drivers/net/virtio_net.ko.xz"


def test_unknown_module_is_an_error() -> None:
    with pytest.raises(ImageError, match=r"evdev .* neither in modules.dep nor builtin"):
        initramfs.load_order(("evdev",), {}, set())


def test_cpio_archive_is_newc_and_reproducible() -> None:
    def archive() -> bytes:
        w = initramfs.CpioWriter()
        w.directory("bin")
        w.file("init", b"#!/bin/sh\n", 0o755)
        w.symlink("bin/sh", "busybox")
        w.char_device("dev/console", 5, 1)
        return w.finish()

    data = archive()
    assert data == archive()
    assert data.startswith(b"070701") and len(data) % 4 == 0
    assert b"TRAILER!!!\0" in data


def test_host_mirror_reads_deb822_and_list_files(tmp_path: Path) -> None:
    (tmp_path / "sources.list.d").mkdir()
    assert rootfs.host_mirror("bookworm", tmp_path) == rootfs.FALLBACK_MIRROR
    (tmp_path / "sources.list").write_text(
        "deb [arch=amd64] http://list.example/debian bookworm main\n"
    )
    assert rootfs.host_mirror("bookworm", tmp_path) == "http://list.example/debian"
    (tmp_path / "sources.list.d" / "debian.sources").write_text(
        "Types: deb\nURIs: http://sec.example/debian-security\nSuites: bookworm-security\n\n"
        "Types: deb\n# comment\nURIs: http://mirror.example/debian/\n"
        "Suites: bookworm bookworm-updates\n"
    )
    assert rootfs.host_mirror("bookworm", tmp_path) == "http://mirror.example/debian"
