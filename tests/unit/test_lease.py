"""Disk leases: one writer per disk, whoever races and however the path is spelt."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from ferry.errors import StorageError
from ferry.storage import lease


def test_of_two_hosts_racing_for_a_free_disk_exactly_one_wins(tmp_path: Path) -> None:
    for trial in range(200):
        disk = tmp_path / f"d{trial}.img"
        disk.touch()
        won: list[str] = []
        start = threading.Barrier(2)

        def take(
            host: str, disk: Path = disk, won: list[str] = won, start: threading.Barrier = start
        ) -> None:
            start.wait()
            try:
                lease.acquire(str(disk), host, "vm")
                won.append(host)
            except StorageError:
                pass

        threads = [threading.Thread(target=take, args=(h,)) for h in ("h1", "h2")]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(won) == 1, f"trial {trial}: {won}"
        held = lease.read_lease(str(disk))
        assert held is not None and held.host == won[0]


def test_a_symlink_to_the_disk_finds_its_lease(tmp_path: Path) -> None:
    disk = tmp_path / "vm.img"
    disk.touch()
    alias = tmp_path / "alias.img"
    alias.symlink_to(disk)
    lease.acquire(str(disk), "h1", "vm")
    with pytest.raises(StorageError, match="leased by domain 'vm' on host h1"):
        lease.acquire(str(alias), "h2", "other")


def test_the_holder_may_take_its_own_lease_again(tmp_path: Path) -> None:
    disk = tmp_path / "vm.img"
    disk.touch()
    first = lease.acquire(str(disk), "h1", "vm")
    again = lease.acquire(str(disk), "h1", "vm")
    assert again.host == "h1" and again.token != first.token
    lease.release(str(disk), "h2")  # not the holder: nothing happens
    assert lease.read_lease(str(disk)) is not None
    lease.release(str(disk), "h1")
    assert lease.read_lease(str(disk)) is None
