"""--copy-storage's checks, in milliseconds: settings, the disks a target makes,
what it accepts from a source, and the source's reading of the target's answer."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from ferry.domain.config import DomainConfig
from ferry.domain.disks import DiskSpec
from ferry.domain.state import DomainState
from ferry.errors import ConfigError, MigrationError, StorageError
from ferry.host.arriving_disks import discard_disks, make_disks
from ferry.host.record import DomainRecord
from ferry.migration.disk_mirror import _storage
from ferry.migration.params import MigrationParams
from ferry.storage import new_disk
from ferry.storage.new_disk import check_new_disk, copied_disks, create_image

MIB = 1 << 20


def test_settings() -> None:
    params = MigrationParams.from_wire({"copy_storage": True, "sync_writes": True})
    assert params.capabilities()["pause-before-switchover"]
    assert params.to_wire()["copy_storage"] is True
    # A target from before copy_storage must still take an ordinary migration.
    assert "copy_storage" not in MigrationParams().to_wire()
    assert "sync_writes" not in MigrationParams().to_wire()
    assert not MigrationParams().capabilities()["pause-before-switchover"]
    with pytest.raises(ConfigError, match="postcopy and copy_storage"):
        MigrationParams.from_wire({"copy_storage": True, "postcopy": True, "channels": 1})
    with pytest.raises(ConfigError, match="sync_writes is a setting of copy_storage"):
        MigrationParams.from_wire({"sync_writes": True})


def config(disks: list[dict[str, Any]]) -> DomainConfig:
    return DomainConfig.from_mapping({"name": "vm", "memory": 64, "disk": disks}, "test")


def test_only_writable_file_disks_are_copied() -> None:
    cfg = config([
        {"path": "/srv/a.img", "target": "xvda"},
        {"path": "/srv/iso.img", "target": "xvdb", "mode": "r"},
        {"path": "nbd://store:10809/x", "target": "xvdc"},
    ])  # fmt: skip
    assert [d.target for d in copied_disks(cfg)] == ["xvda"]


def test_a_new_disk_goes_only_where_no_file_is(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    disk = DiskSpec(path=str(root / "a.img"), format="raw")
    assert check_new_disk(disk, [root], MIB) == str(root / "a.img")
    (root / "a.img").write_bytes(b"someone's data")
    with pytest.raises(StorageError, match="exists here already"):
        check_new_disk(disk, [root], MIB)
    # A dangling symlink is a file too: making the disk would write through it.
    (root / "b.img").symlink_to(tmp_path / "elsewhere.img")
    with pytest.raises(StorageError, match="exists here already"):
        check_new_disk(DiskSpec(path=str(root / "b.img"), format="raw"), [root], MIB)
    with pytest.raises(StorageError, match="outside this host's storage roots"):
        check_new_disk(DiskSpec(path=str(tmp_path / "c.img"), format="raw"), [root], MIB)
    # A directory that leads out of the roots by a symlink is outside them.
    (root / "out").symlink_to(tmp_path)
    with pytest.raises(StorageError, match="outside this host's storage roots"):
        check_new_disk(DiskSpec(path=str(root / "out" / "d.img"), format="raw"), [root], MIB)
    with pytest.raises(StorageError, match="MiB free"):
        check_new_disk(DiskSpec(path=str(root / "e.img")), [root], 1 << 60)


async def test_an_image_is_made_whole_or_not_at_all(tmp_path: Path) -> None:
    path = tmp_path / "a.qcow2"
    await create_image(str(path), "qcow2", 64 * MIB)
    assert path.exists()
    before = path.read_bytes()
    with pytest.raises(StorageError, match="refusing to overwrite"):
        await create_image(str(path), "qcow2", 32 * MIB)
    assert path.read_bytes() == before
    with pytest.raises(StorageError, match="not possible"):
        await create_image(str(tmp_path / "b.img"), "vmdk", MIB)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.qcow2"]  # no temporary left


async def test_made_disks_are_recorded_and_discarded(tmp_path: Path) -> None:
    cfg = config([
        {"path": str(tmp_path / "a.img"), "target": "xvda", "format": "raw"},
        {"path": str(tmp_path / "b.img"), "target": "xvdb", "format": "raw"},
    ])  # fmt: skip
    record = DomainRecord(cfg, 1, DomainState.MIGRATING_IN, 0.0, [], "tcg")
    (tmp_path / "b.img").write_bytes(b"not ours")
    with pytest.raises(StorageError, match="refusing to overwrite"):
        await make_disks(record, [(d, MIB, d.path) for d in cfg.disks], lambda: None)
    # The first was made and recorded; the second was somebody's and is untouched.
    assert [d.path for d in record.created_disks] == [str(tmp_path / "a.img")]
    assert record.created_disks[0].ino == (tmp_path / "a.img").stat().st_ino
    reloaded = DomainRecord.from_json(record.to_json(), "test")
    assert reloaded.created_disks == record.created_disks
    discard_disks(record)
    assert record.created_disks == []
    assert not (tmp_path / "a.img").exists()
    assert (tmp_path / "b.img").read_bytes() == b"not ours"


async def test_a_stale_record_never_removes_a_later_disk(tmp_path: Path) -> None:
    """A record that outlived its disk names a path where another disk is now."""
    cfg = config([{"path": str(tmp_path / "a.img"), "target": "xvda", "format": "raw"}])
    record = DomainRecord(cfg, 1, DomainState.MIGRATING_IN, 0.0, [], "tcg")
    await make_disks(record, [(cfg.disks[0], MIB, cfg.disks[0].path)], lambda: None)
    stale = DomainRecord.from_json(record.to_json(), "test")
    # (Made while ours still exists, the later disk cannot reuse its inode.)
    (tmp_path / "later.img").write_bytes(b"a later domain's disk")
    discard_disks(record)
    (tmp_path / "later.img").rename(tmp_path / "a.img")
    discard_disks(stale)
    assert (tmp_path / "a.img").read_bytes() == b"a later domain's disk"
    # A record of before identities were kept names a path only: never removed.
    old = DomainRecord.from_json(
        {**record.to_json(), "created_disks": [str(tmp_path / "a.img")]}, "test"
    )
    discard_disks(old)
    assert (tmp_path / "a.img").exists()
    # Nor a symlink put where the disk was: what it leads to stays.
    (tmp_path / "a.img").unlink()
    await make_disks(record, [(cfg.disks[0], MIB, cfg.disks[0].path)], lambda: None)
    made = record.created_disks[0]
    (tmp_path / "a.img").rename(tmp_path / "moved.img")
    (tmp_path / "a.img").symlink_to(tmp_path / "moved.img")
    discard_disks(record)
    assert (tmp_path / "moved.img").stat().st_ino == made.ino


async def test_a_disk_that_cannot_be_recorded_is_removed(tmp_path: Path) -> None:
    cfg = config([{"path": str(tmp_path / "a.img"), "target": "xvda", "format": "raw"}])
    record = DomainRecord(cfg, 1, DomainState.MIGRATING_IN, 0.0, [], "tcg")

    def full() -> None:
        raise OSError(28, "No space left on device")

    with pytest.raises(StorageError, match="cannot record it"):
        await make_disks(record, [(cfg.disks[0], MIB, cfg.disks[0].path)], full)
    assert not (tmp_path / "a.img").exists()
    assert record.created_disks == []


def test_removal_errors_are_reported(tmp_path: Path) -> None:
    (tmp_path / "dir.img").mkdir()
    st = (tmp_path / "dir.img").stat()
    why = new_disk.remove_made_disk(
        new_disk.MadeDisk(str(tmp_path / "dir.img"), st.st_dev, st.st_ino)
    )
    assert why is not None and "dir.img" in why
    assert os.path.isdir(tmp_path / "dir.img")
    assert new_disk.remove_made_disk(new_disk.MadeDisk(str(tmp_path / "gone"), 1, 2)) is None


def test_free_space_is_summed_over_the_disks_of_one_file_system(tmp_path: Path) -> None:
    free = shutil.disk_usage(tmp_path).free
    half = (free - new_disk.FREE_MARGIN) // 2 + MIB
    reserved: dict[int, int] = {}
    check_new_disk(DiskSpec(path=str(tmp_path / "a.img")), [tmp_path], half, reserved)
    with pytest.raises(StorageError, match="with the disks before it"):
        check_new_disk(DiskSpec(path=str(tmp_path / "b.img")), [tmp_path], half, reserved)
    # Each alone fits.
    check_new_disk(DiskSpec(path=str(tmp_path / "b.img")), [tmp_path], half)


def test_half_made_disks_left_by_a_crash_are_removed(tmp_path: Path) -> None:
    (tmp_path / "vm").mkdir()
    old = tmp_path / "vm" / ".a.img.part-0123abcd"
    fresh = tmp_path / ".b.img.part-89abcdef"
    disk = tmp_path / "c.img"
    theirs = tmp_path / ".notes.part-two"  # an operator's file, not one of ours
    for path in (old, fresh, disk, theirs):
        path.write_bytes(b"x")
    for path in (old, disk, theirs):
        os.utime(path, (0, 0))
    assert new_disk.remove_part_files([tmp_path], 3600) == [str(old)]
    assert fresh.exists() and disk.exists() and theirs.exists()


@pytest.mark.parametrize(
    ("storage", "why"),
    [
        ({}, "no usable port"),
        ({"port": True, "exports": {"0": "x"}}, "no usable port"),
        ({"port": 70000, "exports": {"0": "x"}}, "no usable port"),
        ({"port": 10809}, "exported no disks"),
        ({"port": 10809, "exports": {"1": "x"}}, "no disk vda"),
        ({"port": 10809, "exports": {"0": "a\nb"}}, "no disk vda"),
        ({"port": 10809, "exports": {"0": "x" * 65}}, "no disk vda"),
    ],
)
def test_a_targets_answer_is_checked(storage: dict[str, Any], why: str) -> None:
    with pytest.raises(MigrationError, match=why):
        _storage(storage, [0], "h2")
    assert _storage({"port": 10809, "exports": {"0": "ferry-disk0"}}, [0], "h2") == (
        10809,
        {0: "ferry-disk0"},
    )
