"""The guest's memory workload, run here: its pacing, its counter, its refusals."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from ferry.util.wait import wait_until_sync

from .guest_files import load_dirty

dirty = load_dirty()


def test_it_writes_whole_fresh_pages_at_about_the_rate_asked() -> None:
    state = dirty.State()
    began = time.monotonic()
    workload = state.start(40.0, 4)  # 40 MiB/s = 10240 pages/s, over 1024 pages
    try:
        time.sleep(0.5)
        pages = state.status()["pages"]
        rate = pages / (time.monotonic() - began)
        # Paced, not flat out: at most a generous margin over 10240 pages/s
        # (a loaded machine may hold it back: the rate reached is checked next).
        assert 0 < rate < 14000, (pages, rate)
        wait_until_sync(lambda: state.status()["mib_s"] > 20, timeout=5, what="a measured rate")
    finally:
        with state.lock:
            state.stop_locked()
    assert not workload.thread.is_alive()
    assert state.status() == {"running": False, "rate_mib": 0, "wss_mib": 0, "pages": 0, "mib_s": 0}


def test_a_new_start_replaces_the_running_workload() -> None:
    state = dirty.State()
    first = state.start(10.0, 2)
    second = state.start(20.0, 3)
    try:
        assert not first.thread.is_alive() and second.thread.is_alive()
        assert state.status()["wss_mib"] == 3
    finally:
        with state.lock:
            state.stop_locked()


@pytest.mark.parametrize(
    "query", ["rate_mib=0", "rate_mib=x", "wss_mib=0", "wss_mib=99999", "wss_mib=1.5"]
)
def test_bad_parameters_are_refused_with_the_reason(query: str) -> None:
    with pytest.raises(ValueError, match="must be"):
        dirty.parse_start(query)


def test_defaults_when_nothing_is_given() -> None:
    assert dirty.parse_start("") == (8.0, 64, False)
    assert dirty.parse_start("disk=1") == (8.0, 64, True)
    with pytest.raises(ValueError, match="disk must be 0 or 1"):
        dirty.parse_start("disk=yes")


def test_the_disk_workload_writes_its_file_through(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "dirty" / "dirty.bin"
    monkeypatch.setattr(dirty, "DISK_FILE", str(path))
    synced: list[int] = []
    real = os.fdatasync
    monkeypatch.setattr(dirty.os, "fdatasync", lambda fd: (synced.append(fd), real(fd)))
    state = dirty.State()
    state.start(8.0, 1, disk=True)
    try:
        wait_until_sync(lambda: state.status()["pages"] > 300, timeout=10, what="pages written")
        assert state.status()["disk"] is True
    finally:
        with state.lock:
            state.stop_locked()
    assert path.stat().st_size == 1 << 20
    assert len(set(path.read_bytes()[i : i + 4096] for i in range(0, 1 << 20, 4096))) > 200
    assert synced, "each pacing step reaches the disk"
