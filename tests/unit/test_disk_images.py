"""Disk images read with the real qemu-img: format, backing chain, corruption, cache safety."""

from __future__ import annotations

import struct
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from ferry.domain.config import DomainConfig
from ferry.domain.disks import DiskSpec
from ferry.errors import ConfigError, StorageError
from ferry.storage import cache_safety, images

from .migration_harness import Cluster, running

L1_TABLE_OFFSET = 40
REFCOUNT_TABLE_OFFSET = 48


def qemu_img(*args: str) -> None:
    subprocess.run(["qemu-img", *args], check=True, capture_output=True)


def raw(path: Path, size: str = "4M") -> Path:
    qemu_img("create", "-f", "raw", str(path), size)
    return path


BACKING_FORMAT_EXTENSION = bytes.fromhex("e2792aca")


def qcow2(path: Path, backing: Path | None = None, fmt: str | None = "raw") -> Path:
    args = ["create", "-f", "qcow2"]
    if backing is not None:
        args += ["-b", str(backing), "-F", fmt or "raw"]
    qemu_img(*args, str(path), *([] if backing else ["4M"]))
    if fmt is None:
        # As an old qemu-img wrote it: the header extension naming the backing
        # format renamed to one QEMU skips as unknown.
        data = path.read_bytes()
        at = data.index(BACKING_FORMAT_EXTENSION, 0, 4096)
        path.write_bytes(data[:at] + b"\x7f\x00\x00\x01" + data[at + 4 :])
    return path


def patch(path: Path, offset: int, value: int) -> None:
    data = bytearray(path.read_bytes())
    struct.pack_into(">Q", data, offset, value)
    path.write_bytes(data)


async def test_format_and_size_are_read_from_the_image_not_its_name(tmp_path: Path) -> None:
    disguised = qcow2(tmp_path / "disk.img")
    facts = await images.inspect(DiskSpec(str(disguised)), [tmp_path], [])
    assert (facts.format, facts.virtual_size, facts.backing) == ("qcow2", 4 << 20, ())
    facts = await images.inspect(DiskSpec(str(raw(tmp_path / "r.qcow2"))), [tmp_path], [])
    assert facts.format == "raw"


async def test_a_stated_format_must_be_the_images(tmp_path: Path) -> None:
    disk = DiskSpec(str(raw(tmp_path / "a.img")), format="qcow2")
    with pytest.raises(StorageError, match=r"a\.img is a raw image, not qcow2 as the config says"):
        await images.inspect(disk, [tmp_path], [])


async def test_backing_chain_inside_the_roots_is_followed(tmp_path: Path) -> None:
    base = raw(tmp_path / "base.img")
    middle = qcow2(tmp_path / "middle.qcow2", base)
    top = qcow2(tmp_path / "top.qcow2", middle, "qcow2")
    facts = await images.inspect(DiskSpec(str(top)), [tmp_path], [])
    assert facts.backing == (str(middle), str(base))


async def test_backing_file_outside_the_roots_is_refused(tmp_path: Path) -> None:
    roots = tmp_path / "xen"
    roots.mkdir()
    outside = raw(tmp_path / "secret.img")
    top = qcow2(roots / "top.qcow2", outside)
    with pytest.raises(StorageError) as err:
        await images.inspect(DiskSpec(str(top)), [roots], [])
    message = str(err.value)
    assert "backing file" in message and "outside this host's storage roots" in message
    assert "\n" not in message


async def test_backing_file_without_a_recorded_format_is_refused(tmp_path: Path) -> None:
    top = qcow2(tmp_path / "top.qcow2", raw(tmp_path / "base.img"), fmt=None)
    with pytest.raises(StorageError, match="no recorded format"):
        await images.inspect(DiskSpec(str(top)), [tmp_path], [])


async def test_other_formats_are_refused_with_the_way_out(tmp_path: Path) -> None:
    vmdk = tmp_path / "a.vmdk"
    qemu_img("create", "-f", "vmdk", str(vmdk), "4M")
    with pytest.raises(StorageError, match="is a vmdk image: ferry runs raw and qcow2"):
        await images.inspect(DiskSpec(str(vmdk)), [tmp_path], [])


async def test_corrupt_qcow2_images_are_refused(tmp_path: Path) -> None:
    unreadable = qcow2(tmp_path / "l1.qcow2")
    patch(unreadable, L1_TABLE_OFFSET, 0x12345)
    with pytest.raises(StorageError, match="cannot be read as an image: Could not open"):
        await images.inspect(DiskSpec(str(unreadable)), [tmp_path], [])
    # Opens fine; only qemu-img check finds it, and pinning runs the check.
    broken = qcow2(tmp_path / "refcount.qcow2")
    patch(broken, REFCOUNT_TABLE_OFFSET, 1 << 40)
    cfg = DomainConfig.from_mapping({"name": "vm", "disk": [{"path": str(broken)}]})
    with pytest.raises(StorageError, match="is a corrupt qcow2 image"):
        await images.pin_formats(cfg, [tmp_path], [])


async def test_pinning_fills_in_each_format(tmp_path: Path) -> None:
    cfg = DomainConfig.from_mapping(
        {
            "name": "vm",
            "disk": [
                {"path": str(raw(tmp_path / "a.img"))},
                {"path": str(qcow2(tmp_path / "b.img")), "mode": "r"},
            ],
        }
    )
    pinned = await images.pin_formats(cfg, [tmp_path], [])
    assert [d.format for d in pinned.disks] == ["raw", "qcow2"]
    assert pinned.to_mapping()["disk"][1]["format"] == "qcow2"


async def test_a_backing_file_another_domain_writes_is_refused(tmp_path: Path) -> None:
    base = raw(tmp_path / "base.img")
    top = qcow2(tmp_path / "top.qcow2", base)
    cfg = DomainConfig.from_mapping({"name": "vm", "disk": [{"path": str(top)}]})
    with pytest.raises(StorageError, match="is written by domain 'other'"):
        await images.pin_formats(cfg, [tmp_path], [], in_use=[("other", str(base))])


def test_disk_keys_are_checked() -> None:
    for key, value, why in (
        ("format", "vmdk", "is not one of raw, qcow2"),
        ("cache", "fast", "is not one of none, directsync"),
    ):
        with pytest.raises(ConfigError, match=why):
            DomainConfig.from_mapping({"name": "a", "disk": [{"path": "/a", key: value}]})


# -- cache safety -----------------------------------------------------------------

MOUNTINFO = """\
22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/vda rw
40 22 0:35 / /xen rw,relatime shared:20 - nfs4 storage:/xen rw,vers=4.2
41 22 0:36 / /xen/local rw,relatime shared:21 - ext4 /dev/vdb rw
42 22 0:37 / /gfs rw,relatime shared:22 - gfs2 /dev/mapper/c rw
43 22 0:38 / /mnt/my\\040share rw - fuse.sshfs host:/x rw
"""


def test_file_system_type_is_the_deepest_mount() -> None:
    assert cache_safety.fs_type("/xen/a.img", MOUNTINFO) == "nfs4"
    assert cache_safety.fs_type("/xen/local/a.img", MOUNTINFO) == "ext4"
    assert cache_safety.fs_type("/xenial/a.img", MOUNTINFO) == "ext4"
    assert cache_safety.fs_type("/mnt/my share/a.img", MOUNTINFO) == "fuse.sshfs"


@pytest.mark.parametrize(
    ("disk", "unsafe"),
    [
        (DiskSpec("/xen/a.img", cache="writeback"), True),
        (DiskSpec("/mnt/my share/a.img", cache="unsafe"), True),
        (DiskSpec("/xen/a.img"), False),  # default none: O_DIRECT
        (DiskSpec("/xen/a.img", cache="directsync"), False),
        (DiskSpec("/xen/a.img", cache="writeback", writable=False), False),
        (DiskSpec("/xen/local/a.img", cache="writeback"), False),
        (DiskSpec("/gfs/a.img", cache="writethrough"), False),  # coherent cluster fs
        (DiskSpec("nfs://storage/xen/a.img", cache="writeback"), False),  # no page cache
    ],
)
def test_migration_hazard_only_for_page_cache_on_shared_fs(disk: DiskSpec, unsafe: bool) -> None:
    hazard = cache_safety.migration_hazard(disk, MOUNTINFO)
    assert (hazard is not None) is unsafe
    if hazard:
        assert "not coherent between hosts" in hazard and "--unsafe" in hazard


# -- through ferryd ------------------------------------------------------------------


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    async with running(Cluster(tmp_path, secure=False)) as c:
        yield c


def mapping(c: Cluster, path: Path, **disk: Any) -> dict[str, Any]:
    config = c.domain()
    config["disk"] = [{"path": str(path), **disk}]
    return config


@pytest.mark.parametrize("problem", ["backing-outside", "corrupt", "missing"])
async def test_create_refuses_a_bad_disk_and_starts_nothing(
    cluster: Cluster, tmp_path: Path, problem: str
) -> None:
    storage = cluster.storage
    if problem == "backing-outside":
        disk = qcow2(storage / "vm.qcow2", raw(tmp_path / "elsewhere.img"))
        why = "outside this host's storage roots"
    elif problem == "corrupt":
        disk = qcow2(storage / "vm.qcow2")
        patch(disk, REFCOUNT_TABLE_OFFSET, 1 << 40)
        why = "corrupt qcow2 image"
    else:
        disk, why = storage / "gone.img", "does not exist"
    h1 = cluster.hosts[0]
    with pytest.raises(StorageError) as err:
        await h1.s.lifecycle.create(mapping(cluster, disk))
    assert str(err.value).startswith("cannot create domain 'vm': ")
    assert why in str(err.value) and "\n" not in str(err.value)
    assert cluster.qemus() == {} and h1.s.table.find("vm") is None


async def test_created_domain_runs_its_pinned_qcow2_and_migrates(cluster: Cluster) -> None:
    disk = qcow2(cluster.storage / "vm.disk")
    h1, h2 = cluster.hosts
    await h1.s.lifecycle.create(mapping(cluster, disk))
    info = h1.s.lifecycle.info("vm")
    assert info["config"]["disk"][0]["format"] == "qcow2"
    (pid,) = cluster.qemus()
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    assert any(b"format=qcow2,cache=none" in a for a in argv)
    await h1.migrate("vm", h2)
    await cluster.assert_runs_once("h2")


async def test_unsafe_cache_is_refused_at_prepare_unless_opted_in(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    shared = "22 1 8:1 / / rw - nfs4 storage:/ rw\n"
    monkeypatch.setattr(cache_safety, "MOUNTINFO", _Text(shared))
    h1, h2 = cluster.hosts
    disk = raw(cluster.storage / "vm.img")
    await h1.s.lifecycle.create(mapping(cluster, disk, cache="writeback"))
    with pytest.raises(Exception, match="cache=writeback on nfs4, whose page cache is not"):
        await h1.migrate("vm", h2)
    await cluster.assert_runs_once("h1")
    await h1.migrate("vm", h2, unsafe_cache=True)
    await cluster.assert_runs_once("h2")


class _Text:
    """Stands in for /proc/self/mountinfo."""

    def __init__(self, text: str) -> None:
        self.text = text

    def read_text(self) -> str:
        return self.text


# -- ferry disk create --------------------------------------------------------------


async def test_disk_create_makes_an_image_of_the_size_and_format(tmp_path: Path) -> None:
    size = images.parse_size("8M")
    made = await images.create_disk(str(tmp_path / "a.qcow2"), size, "qcow2", [tmp_path])
    facts = await images.inspect(DiskSpec(made["path"]), [tmp_path], [])
    assert (facts.format, facts.virtual_size) == ("qcow2", 8 << 20)


async def test_disk_create_never_overwrites_and_stays_in_the_roots(tmp_path: Path) -> None:
    existing = tmp_path / "vm.img"
    existing.write_bytes(b"the guest's data")
    with pytest.raises(StorageError, match="already exists: ferry never overwrites"):
        await images.create_disk(str(existing), 1 << 20, "raw", [tmp_path])
    assert existing.read_bytes() == b"the guest's data"
    with pytest.raises(StorageError, match="outside this host's storage roots"):
        await images.create_disk(str(tmp_path / "a.img"), 1 << 20, "raw", [tmp_path / "xen"])
    with pytest.raises(StorageError, match="outside this host's storage roots"):
        await images.create_disk(str(tmp_path / "x/../../b.img"), 1 << 20, "raw", [tmp_path])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vm.img"]


@pytest.mark.parametrize(
    ("text", "size"), [("10G", 10 << 30), ("512M", 512 << 20), ("4096", 4096), ("1GiB", 1 << 30)]
)
def test_disk_sizes(text: str, size: int) -> None:
    assert images.parse_size(text) == size


@pytest.mark.parametrize("text", ["", "ten", "-1G", "0", "100", "65T", "1.5G"])
def test_bad_disk_sizes(text: str) -> None:
    with pytest.raises(StorageError, match="disk size"):
        images.parse_size(text)


async def test_qcow2_inside_a_fixed_size_export_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async def info(path: str, fmt: str | None, share: bool) -> dict[str, Any]:
        return {"format": "qcow2", "virtual-size": 1 << 30}

    monkeypatch.setattr(images, "image_info", info)
    disk = DiskSpec("nbd://10.42.0.20:10809/vm")
    with pytest.raises(StorageError, match="cannot grow inside a fixed-size export"):
        await images.inspect(disk, [], ["10.42.0.20"])
    facts = await images.inspect(DiskSpec("nfs://10.42.0.20/xen/vm.qcow2"), [], ["10.42.0.20"])
    assert facts.format == "qcow2"  # a file on NFS grows as it is written
