"""The guest seen from client_2: its witness service (up, not rebooted) and the player."""

from __future__ import annotations

import json
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ferry.errors import FerryError
from ferry.lab.lab import Lab
from ferry.lab.player import LabPlayer
from ferry.util.wait import wait_until_sync
from migbench.settings import BUSY_RATE_MIB, BUSY_WSS_MIB, CLIP, CLIP_S, VM


def witness_status(lab: Lab, timeout: float = 20.0) -> dict[str, Any] | None:
    try:
        result = lab.run(
            "client_2", ["python3", "-m", "ferry.lab.witness", "status", VM], timeout=timeout
        )
    except subprocess.TimeoutExpired:
        return None
    if result.returncode != 0:
        return None
    data: dict[str, Any] = json.loads(result.stdout)
    return data


def wait_guest(lab: Lab, timeout: float = 180.0) -> dict[str, Any]:
    """The witness service's status, once it answers (WaitTimeout if it does not)."""
    return wait_until_sync(
        lambda: witness_status(lab) if lab.vm_serving() else None,
        timeout=timeout,
        what=f"{VM}'s services",
        interval=0.5,
    )


def guest_survived(lab: Lab, before: dict[str, Any]) -> bool:
    now = witness_status(lab)
    return bool(now and now.get("boot_id") == before.get("boot_id"))


def workload(lab: Lab, *args: str) -> dict[str, Any]:
    """The guest's memory workload (ferry.lab.dirty): start, stop or status."""
    result = lab.run(
        "client_2", ["python3", "-m", "ferry.lab.dirty", args[0], VM, *args[1:]], timeout=30
    )
    if result.returncode != 0:
        raise RuntimeError(f"guest workload {args[0]}: {result.stderr.strip()}")
    data: dict[str, Any] = json.loads(result.stdout)
    return data


def start_busy(lab: Lab) -> None:
    workload(lab, "start", "--rate", str(BUSY_RATE_MIB), "--wss", str(BUSY_WSS_MIB))
    wait_until_sync(
        lambda: workload(lab, "status")["mib_s"] >= BUSY_RATE_MIB * 0.8,
        timeout=60, interval=0.5, what="the guest to dirty memory at the rate asked",
    )  # fmt: skip


# -- the player ------------------------------------------------------------------


@dataclass
class Player:
    """The lab's viewer playing the clip; its summary, or why there is none."""

    viewer: LabPlayer
    started: float

    @classmethod
    def start(cls, lab: Lab, output: Path) -> Player:
        viewer = LabPlayer(lab, output.parent, output.stem, CLIP, buffer_s=10.0)
        return cls(viewer, time.monotonic())

    def finish(self, timeout: float = CLIP_S + 60) -> dict[str, Any]:
        try:
            report = self.viewer.finish(timeout)
        except FerryError as err:
            return {"error": str(err)}
        return {
            "stalls": len(report.get("stalls", [])),
            "reconnects": report.get("reconnects"),
            "checksum": report.get("checksum"),
            "longest_gap_ms": report.get("longest_gap_ms"),
            "bytes_received": report.get("bytes_received"),
            "ended": report.get("ended"),
            "exit_code": self.viewer.proc.returncode,
        }

    def stop(self) -> None:
        self.viewer.stop()
